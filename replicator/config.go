package replicator

import (
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"time"

	"github.com/hashicorp/memberlist"
)

// Defaults used by DefaultConfig and by Open for zero fields.
const (
	DefaultBindAddr            = "127.0.0.1:7946"
	DefaultReplicas            = 2
	DefaultAckTimeout          = 5 * time.Second
	DefaultAntiEntropyInterval = 5 * time.Second
)

// Config configures a Node. Zero values of optional fields mean the default
// stated on the field.
type Config struct {
	// Name is this node's unique name in the circle (required, at most 255
	// bytes). It is the memberlist node name and the Node part of versions.
	Name string

	// DataDir is the directory holding the bbolt file circle.db (required;
	// created with mode 0700 if missing).
	DataDir string

	// Secret is the circle secret (required; 32 random bytes, at least 16).
	// Keys for memberlist and for replication streams are derived from it
	// with HKDF-SHA256 under distinct labels.
	Secret []byte

	// BindAddr is the gossip bind address host:port (TCP and UDP). Default
	// "127.0.0.1:7946". Port 0 picks a free port (see Node.Addr).
	BindAddr string

	// AdvertiseAddr is the optional host:port others reach this node at.
	// Default: the bound address.
	AdvertiseAddr string

	// Join lists seed peers (host:port; a host name is resolved again at
	// every attempt). A seed that is not the address of a live member is
	// retried in the background with backoff until Close, whether or not
	// this node has other peers; so is every member this node ever knew
	// (see heal.go). Default: none (start a new circle).
	Join []string

	// Replicas is how many nodes (this one included) must hold a record
	// before Put or Delete return; if fewer nodes are alive, all alive nodes.
	// Default 2. 1 means "fsynced locally" only.
	Replicas int

	// AckTimeout bounds how long Put and Delete wait for acknowledgements.
	// Default 5s.
	AckTimeout time.Duration

	// AntiEntropyInterval is the period of digest exchange with one random
	// peer. Default 5s.
	AntiEntropyInterval time.Duration

	// FirstWriterWins names buckets where, between two live records, the
	// EARLIER version wins (a Put over an existing live key is ignored).
	// Default: none.
	FirstWriterWins []string

	// Logger receives the node's logs and memberlist's. Default: discard.
	Logger *slog.Logger

	// Now is the wall clock that versions local writes and judges remote
	// timestamps. Default time.Now. Tests and the fault-injection suite set
	// it to skew one node's clock; memberlist's own timers are not affected.
	Now func() time.Time

	// Transport optionally replaces the network transport (for example a
	// mesh transport that routes by node name). Default: memberlist's
	// NetTransport bound to BindAddr. Replication streams are carried over
	// it too. The Node shuts it down on Close.
	Transport memberlist.NodeAwareTransport

	// tune, if set, adjusts the memberlist configuration just before it is
	// used (tests make failure detection fast or slow with it).
	tune func(*memberlist.Config)
}

// DefaultConfig returns a Config with every default filled in; Name,
// DataDir and Secret must still be set.
func DefaultConfig() Config {
	return Config{
		BindAddr:            DefaultBindAddr,
		Replicas:            DefaultReplicas,
		AckTimeout:          DefaultAckTimeout,
		AntiEntropyInterval: DefaultAntiEntropyInterval,
	}
}

// withDefaults returns cfg with zero fields defaulted, or an error wrapping
// ErrInvalid.
func (cfg Config) withDefaults() (Config, error) {
	if cfg.Name == "" {
		return cfg, fmt.Errorf("%w: config: name is required", ErrInvalid)
	}
	if len(cfg.Name) > maxNodeName {
		return cfg, fmt.Errorf("%w: config: name longer than %d bytes", ErrInvalid, maxNodeName)
	}
	if cfg.DataDir == "" {
		return cfg, fmt.Errorf("%w: config: data dir is required", ErrInvalid)
	}
	if len(cfg.Secret) < 16 {
		return cfg, fmt.Errorf("%w: config: secret must be at least 16 bytes (32 recommended)", ErrInvalid)
	}
	if cfg.BindAddr == "" {
		cfg.BindAddr = DefaultBindAddr
	}
	if _, _, err := splitHostPort(cfg.BindAddr); err != nil {
		return cfg, fmt.Errorf("%w: config: bind address: %w", ErrInvalid, err)
	}
	if cfg.AdvertiseAddr != "" {
		if _, _, err := splitHostPort(cfg.AdvertiseAddr); err != nil {
			return cfg, fmt.Errorf("%w: config: advertise address: %w", ErrInvalid, err)
		}
	}
	for _, b := range cfg.FirstWriterWins {
		if err := checkBucket(b); err != nil {
			return cfg, fmt.Errorf("%w: config: first writer wins bucket: %w", ErrInvalid, err)
		}
	}
	if cfg.Replicas <= 0 {
		cfg.Replicas = DefaultReplicas
	}
	if cfg.AckTimeout <= 0 {
		cfg.AckTimeout = DefaultAckTimeout
	}
	if cfg.AntiEntropyInterval <= 0 {
		cfg.AntiEntropyInterval = DefaultAntiEntropyInterval
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	cfg.Secret = append([]byte(nil), cfg.Secret...)
	cfg.Join = append([]string(nil), cfg.Join...)
	return cfg, nil
}

// splitHostPort splits host:port and resolves host to an IP address (empty
// host means all interfaces, "0.0.0.0").
func splitHostPort(addr string) (string, int, error) {
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, err
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 0 || port > 65535 {
		return "", 0, fmt.Errorf("bad port in %q", addr)
	}
	if host == "" {
		return "0.0.0.0", port, nil
	}
	if ip := net.ParseIP(host); ip != nil {
		return ip.String(), port, nil
	}
	ipa, err := net.ResolveIPAddr("ip", host)
	if err != nil {
		return "", 0, fmt.Errorf("resolving %q: %w", host, err)
	}
	return ipa.IP.String(), port, nil
}
