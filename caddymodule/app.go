package caddymodule

import (
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/homecircle/circle/caddymodule/circlenode"
	"github.com/homecircle/circle/identity"
	"github.com/homecircle/circle/replicator"
)

func init() {
	caddy.RegisterModule(App{})
}

// Defaults of the circle app.
const (
	// DefaultListen is the gossip bind address when Listen is empty.
	DefaultListen = "0.0.0.0:7946"
	// DefaultReplicas is the acknowledgement count when Replicas is 0.
	DefaultReplicas = 2
	// secretLen is the length of a decoded circle secret.
	secretLen = 32
)

// App is the `circle` app: this process's node of a circle. It owns (through
// a process-wide pool shared with `storage circle` and the handlers) one
// replicator node and one identity service.
//
// Secrets never appear in the JSON config: use SecretFile, or Secret with an
// {env.*} or {file.*} placeholder, which is resolved at Provision.
type App struct {
	// Name is this node's name, unique in the circle. Required.
	Name string `json:"name,omitempty"`

	// DomainName is the shared circle domain; the portal lives at its apex
	// and the session cookie is scoped to it. Required.
	DomainName string `json:"domain,omitempty"`

	// SecretFile is the path of a file holding the circle secret (base64 of
	// 32 random bytes, as printed by `caddy circle secret`). Exactly one of
	// SecretFile and Secret is required.
	SecretFile string `json:"secret_file,omitempty"`

	// Secret is the circle secret given as a placeholder, such as
	// "{env.CIRCLE_SECRET}" or "{file./run/secrets/circle}". Literal values
	// are refused so that the secret never sits in the config. Exactly one
	// of SecretFile and Secret is required.
	Secret string `json:"secret,omitempty"`

	// DataDir is the directory of this node's durable state (bbolt).
	// Default: "circle/<name>" under Caddy's data directory.
	DataDir string `json:"data_dir,omitempty"`

	// Listen is the mesh bind address (host:port, UDP): memberlist,
	// replication and circle services all travel over one QUIC mesh on
	// this socket. Default: "0.0.0.0:7946".
	Listen string `json:"listen,omitempty"`

	// Advertise is the address other nodes reach this node at (host:port;
	// a specific IP). Default: Listen if its host is a specific IP, else
	// this machine's first private (else public) IPv4 address with
	// Listen's port.
	Advertise string `json:"advertise,omitempty"`

	// Join lists seed peers (host:port). Unreachable seeds are retried in
	// the background. Default: none (a circle of one until others join us).
	Join []string `json:"join,omitempty"`

	// Replicas is how many nodes (this one included) hold an acknowledged
	// write, when that many are up. Default: 2.
	Replicas int `json:"replicas,omitempty"`

	// Relay is the address ([host]:port, UDP) this node serves TURN/STUN
	// on for nodes behind NAT; set it on nodes that are reachable from the
	// internet (a public address or a forwarded port). Default: off.
	Relay string `json:"relay,omitempty"`

	// Services are the circle services this node offers: name ->
	// host:port of a local TCP app. Any node of the circle reaches them
	// with `reverse_proxy NAME { transport circle }`, over the mesh, and
	// fails over between the nodes offering the same name. Names are 1 to
	// 63 of a-z, 0-9 and '-'. Unlike the other settings, services change
	// with a config reload.
	Services map[string]string `json:"services,omitempty"`

	// AckTimeout bounds how long an acknowledged write waits for replicas.
	// Default: 5s.
	AckTimeout caddy.Duration `json:"ack_timeout,omitempty"`

	// AntiEntropyInterval is how often this node exchanges digests with a
	// random peer. Default: 5s.
	AntiEntropyInterval caddy.Duration `json:"anti_entropy_interval,omitempty"`

	// SyncTimeout bounds how long provisioning waits for a first exchange of
	// state with a peer when Join is set, so that a node that (re)starts sees
	// the circle's shared CA and certificates before it would create its
	// own. Default: 10s.
	SyncTimeout caddy.Duration `json:"sync_timeout,omitempty"`

	// MaxClockSkew is how far ahead of this node's clock another node's
	// record versions may be: records from further ahead are kept aside
	// until this clock catches up, and members whose measured clock offset
	// exceeds it are flagged in the status and the logs. Default: 1m.
	MaxClockSkew caddy.Duration `json:"max_clock_skew,omitempty"`

	secret []byte
	node   *sharedNode
	ident  *identity.Service // the node's (tests of handlers set only this)
	// clockOffset shifts the node's wall clock (ClockOffsetEnv).
	clockOffset time.Duration
	poolKey     string
	logger      *zap.Logger
	ctx         caddy.Context
	httpsPort   int // the http app's https_port when not 443 (for links); 0 otherwise
}

// CaddyModule returns the Caddy module information.
func (App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "circle",
		New: func() caddy.Module { return new(App) },
	}
}

// activeApp is the circle app of the running config, for the admin API
// (whose routers are provisioned before apps and outlive failed reloads).
var activeApp atomic.Pointer[App]

// Provision resolves the secret, applies defaults and opens (or reuses) this
// process's node. The node is opened here rather than in Start because
// `storage circle` and the pki/tls apps read and write certificates while
// they are provisioned, before any app starts; see docs/INTERNALS.md,
// "caddymodule: node lifecycle".
func (a *App) Provision(ctx caddy.Context) error {
	a.ctx = ctx
	a.logger = ctx.Logger()

	secret, err := a.loadSecret()
	if err != nil {
		return fmt.Errorf("loading circle secret: %w", err)
	}
	a.secret = secret

	if a.Name == "" {
		return errors.New("circle: name is required")
	}
	if a.DomainName == "" {
		return errors.New("circle: domain is required")
	}
	a.DomainName = strings.ToLower(strings.TrimSuffix(a.DomainName, "."))
	if a.DataDir == "" {
		a.DataDir = filepath.Join(caddy.AppDataDir(), "circle", a.Name)
	}
	if abs, err := filepath.Abs(a.DataDir); err == nil {
		a.DataDir = abs
	}
	if a.Listen == "" {
		a.Listen = DefaultListen
	}
	if a.Replicas == 0 {
		a.Replicas = DefaultReplicas
	}
	if a.SyncTimeout == 0 {
		a.SyncTimeout = caddy.Duration(10 * time.Second)
	}
	if v := os.Getenv(ClockOffsetEnv); v != "" {
		off, err := time.ParseDuration(v)
		if err != nil {
			return fmt.Errorf("circle: %s=%q: want a Go duration such as 10m or -2m30s", ClockOffsetEnv, v)
		}
		a.clockOffset = off
		a.logger.Warn("this node's clock is shifted for testing", zap.String("env", ClockOffsetEnv), zap.Duration("offset", off))
	}
	if err := a.validate(); err != nil {
		return err
	}

	a.poolKey = poolKey(a.Name, a.DataDir)
	node, err := acquireNode(a.poolKey, a.nodeConfig(ctx), a.logger)
	if err != nil {
		a.poolKey = ""
		return fmt.Errorf("opening circle node: %w", err)
	}
	a.node = node
	a.ident = node.Identity()
	return nil
}

// validate checks the provisioned fields without echoing secrets.
func (a *App) validate() error {
	if strings.ContainsAny(a.Name, " /\t\n") {
		return fmt.Errorf("circle: invalid name %q", a.Name)
	}
	if a.Replicas < 1 {
		return fmt.Errorf("circle: replicas must be at least 1, got %d", a.Replicas)
	}
	if a.MaxClockSkew < 0 {
		return fmt.Errorf("circle: max_clock_skew must not be negative, got %v", time.Duration(a.MaxClockSkew))
	}
	for _, hp := range append([]string{a.Listen}, a.Join...) {
		if _, _, err := net.SplitHostPort(hp); err != nil {
			return fmt.Errorf("circle: address %q: %v", hp, err)
		}
	}
	if a.Advertise != "" {
		if _, _, err := net.SplitHostPort(a.Advertise); err != nil {
			return fmt.Errorf("circle: advertise address %q: %v", a.Advertise, err)
		}
	}
	if a.Relay != "" {
		if _, port, err := net.SplitHostPort(a.Relay); err != nil || port == "" {
			return fmt.Errorf("circle: relay address %q: want [host]:port", a.Relay)
		}
	}
	return circlenode.ValidateServices(a.Services)
}

// loadSecret reads the circle secret from SecretFile or resolves the Secret
// placeholder. Errors never contain the secret.
func (a *App) loadSecret() ([]byte, error) {
	var raw string
	switch {
	case a.SecretFile != "" && a.Secret != "":
		return nil, errors.New("use either secret_file or secret, not both")
	case a.SecretFile != "":
		b, err := os.ReadFile(a.SecretFile)
		if err != nil {
			return nil, fmt.Errorf("reading secret_file: %w", err)
		}
		raw = string(b)
	case a.Secret != "":
		if !isPlaceholder(a.Secret) {
			return nil, errors.New("secret must be an {env.*} or {file.*} placeholder; put literal secrets in secret_file")
		}
		v, err := caddy.NewReplacer().ReplaceOrErr(a.Secret, true, true)
		if err != nil {
			return nil, errors.New("secret placeholder did not resolve to a value")
		}
		raw = v
	default:
		return nil, errors.New("secret_file (or secret) is required")
	}
	return decodeSecret(raw)
}

// decodeSecret decodes a base64 circle secret of 32 bytes.
func decodeSecret(raw string) ([]byte, error) {
	raw = strings.TrimSpace(raw)
	for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.RawStdEncoding, base64.URLEncoding, base64.RawURLEncoding} {
		if b, err := enc.DecodeString(raw); err == nil {
			if len(b) != secretLen {
				return nil, fmt.Errorf("secret decodes to %d bytes, want %d", len(b), secretLen)
			}
			return b, nil
		}
	}
	return nil, errors.New("secret is not valid base64 (create one with `caddy circle secret`)")
}

// isPlaceholder reports whether s is a single runtime placeholder.
func isPlaceholder(s string) bool {
	return len(s) > 2 && s[0] == '{' && s[len(s)-1] == '}' && strings.Count(s, "{") == 1 &&
		(strings.HasPrefix(s, "{env.") || strings.HasPrefix(s, "{file."))
}

// maxClockSkew is MaxClockSkew or its default.
func (a *App) maxClockSkew() time.Duration {
	if a.MaxClockSkew > 0 {
		return time.Duration(a.MaxClockSkew)
	}
	return replicator.DefaultMaxClockSkew
}

// ClockOffsetEnv names an environment variable that shifts a node's wall
// clock, as the replicator and the identity service see it, by a Go
// duration ("10m", "-2m"). It exists for tests of real processes with a
// skewed clock (Go programs ignore libfaketime); leave it unset otherwise.
const ClockOffsetEnv = "CIRCLE_CLOCK_OFFSET"

// nodeConfig translates the app config into the shared node's settings.
func (a *App) nodeConfig(ctx caddy.Context) circlenode.Config {
	rc := replicator.DefaultConfig()
	rc.Name = a.Name
	rc.DataDir = a.DataDir
	rc.Secret = a.secret
	rc.BindAddr = a.Listen
	rc.AdvertiseAddr = a.Advertise
	rc.Join = append([]string(nil), a.Join...)
	rc.Replicas = a.Replicas
	if a.AckTimeout > 0 {
		rc.AckTimeout = time.Duration(a.AckTimeout)
	}
	if a.AntiEntropyInterval > 0 {
		rc.AntiEntropyInterval = time.Duration(a.AntiEntropyInterval)
	}
	rc.MaxClockSkew = a.maxClockSkew()
	if off := a.clockOffset; off != 0 {
		rc.Now = func() time.Time { return time.Now().Add(off) } // identity follows it through Node.Now
	}
	circlenode.IdentityBuckets(&rc)
	rc.Logger = ctx.Slogger().With("component", "replicator")
	return circlenode.Config{
		Listen:     a.Listen,
		Advertise:  a.Advertise,
		Relay:      a.Relay,
		Logger:     ctx.Slogger(),
		Replicator: rc,
		Identity: identity.Config{
			Domain: a.DomainName,
			Secret: a.secret,
			Node:   a.Name,
			Logger: ctx.Slogger().With("component", "identity"),
		},
		SyncTimeout: time.Duration(a.SyncTimeout),
	}
}

// Start makes this app the one the admin API serves. The node was opened
// (and joined) in Provision.
func (a *App) Start() error {
	// Every app is provisioned by now; links to the portal carry the HTTPS
	// port when it is not the default one.
	if a.ctx.Context != nil {
		if h, err := a.ctx.AppIfConfigured("http"); err == nil {
			if httpApp, ok := h.(*caddyhttp.App); ok && httpApp.HTTPSPort != 0 && httpApp.HTTPSPort != 443 {
				a.httpsPort = httpApp.HTTPSPort
			}
		}
	}
	a.node.Services().Set(a, a.Services)
	activeApp.Store(a)
	a.logger.Info("circle node running",
		zap.String("name", a.Name),
		zap.String("domain", a.DomainName),
		zap.String("listen", a.Listen),
		zap.Strings("join", a.Join),
		zap.String("advertise", a.node.Mesh().Addr().String()),
		zap.String("relay", a.node.TURNAddr()),
		zap.Any("services", a.Services))
	return nil
}

// Stop detaches this app from the admin API; the node stays open while a
// newer config uses it and is closed by Cleanup of the last user.
func (a *App) Stop() error {
	activeApp.CompareAndSwap(a, nil)
	if a.node != nil {
		a.node.Services().Remove(a)
	}
	return nil
}

// Cleanup releases this config's reference to the shared node. It tolerates
// partial provisioning.
func (a *App) Cleanup() error {
	activeApp.CompareAndSwap(a, nil)
	if a.node != nil {
		a.node.Services().Remove(a)
	}
	if a.poolKey == "" {
		return nil
	}
	_, err := nodes.Delete(a.poolKey)
	a.poolKey = ""
	a.node = nil
	a.ident = nil
	return err
}

// Identity returns the circle's identity service.
func (a *App) Identity() *identity.Service {
	return a.ident
}

// Replicator returns this process's replicator node.
func (a *App) Replicator() *replicator.Node {
	if a.node == nil {
		return nil
	}
	return a.node.Replicator()
}

// Domain returns the circle domain (lowercase, no trailing dot).
func (a *App) Domain() string { return a.DomainName }

// portalHost is the host (and port, when not 443) of the portal.
func (a *App) portalHost() string {
	if a.httpsPort != 0 {
		return net.JoinHostPort(a.DomainName, strconv.Itoa(a.httpsPort))
	}
	return a.DomainName
}

// NodeName returns this node's name.
func (a *App) NodeName() string { return a.Name }

// storageKey returns the at-rest encryption key for certificate private
// keys, derived from the circle secret.
func (a *App) storageKey() []byte {
	if a.node == nil {
		return nil
	}
	return a.node.StorageKey()
}

// Interface guards
var (
	_ caddy.App          = (*App)(nil)
	_ caddy.Provisioner  = (*App)(nil)
	_ caddy.CleanerUpper = (*App)(nil)
)
