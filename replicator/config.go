package replicator

import (
	"fmt"
	"log/slog"
	"net"
	"slices"
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
	DefaultMaxClockSkew        = time.Minute
	DefaultTombstoneHorizon    = 72 * time.Hour
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

	// TombstoneHorizon is how long a tombstone (a deleted record) is kept:
	// older ones are removed from disk and index by a background collector,
	// once this node has completed an anti-entropy exchange after the
	// delete. A node whose last exchange is older than the horizon resyncs
	// fully when it returns (docs/INTERNALS.md, "Garbage collection").
	// Default 72h.
	TombstoneHorizon time.Duration

	// DigestExchangeOnly makes the node behave like a release from before
	// the tree exchange (anti-entropy proportional to the difference): it
	// syncs only by the digest exchange and closes a stream that starts the
	// tree exchange. For tests and benchmarks of mixed-release circles;
	// default false.
	DigestExchangeOnly bool

	// SerialCommit commits every local write in its own transaction (one
	// fsync each), as releases before group commit did, instead of one
	// transaction for all the writes that wait at the same time. For
	// benchmarks; default false.
	SerialCommit bool

	// FirstWriterWins names buckets where, between two live records, the
	// EARLIER version wins (a Put over an existing live key is ignored).
	// Default: none.
	FirstWriterWins []string

	// Merge names buckets whose live records are joined with a MergeFunc
	// instead of replaced by the higher version (see MergeFunc; tombstones
	// stay last writer wins). A bucket cannot be both here and in
	// FirstWriterWins. Default: none.
	Merge map[string]MergeFunc

	// Logger receives the node's logs and memberlist's. Default: discard.
	Logger *slog.Logger

	// Now is the wall clock that versions local writes and judges remote
	// timestamps. Default time.Now. Tests and the fault-injection suite set
	// it to skew one node's clock; memberlist's own timers are not affected.
	Now func() time.Time

	// MaxClockSkew is how far ahead of this node's wall clock (Now) a
	// remote version may be. A record from further ahead is refused: it is
	// not applied, its timestamp does not advance this node's clock, and it
	// is kept aside in memory (bounded) and applied once the local clock has
	// caught up; if it cannot be kept, anti-entropy offers it again later.
	// Peers whose measured clock offset exceeds it are logged and flagged
	// in Members. Default 1 minute.
	MaxClockSkew time.Duration

	// Transport optionally replaces the network transport (for example a
	// mesh transport that routes by node name). Default: memberlist's
	// NetTransport bound to BindAddr. Replication streams are carried over
	// it too. The Node shuts it down on Close.
	Transport memberlist.NodeAwareTransport

	// tune, if set, adjusts the memberlist configuration just before it is
	// used (tests make failure detection fast or slow with it).
	tune func(*memberlist.Config)

	// wire, if set, replaces what the node speaks on the wire (tests play
	// the next release or the previous one with it; version.go).
	wire *wireProfile
}

// DefaultConfig returns a Config with every default filled in; Name,
// DataDir and Secret must still be set.
func DefaultConfig() Config {
	return Config{
		BindAddr:            DefaultBindAddr,
		Replicas:            DefaultReplicas,
		AckTimeout:          DefaultAckTimeout,
		AntiEntropyInterval: DefaultAntiEntropyInterval,
		MaxClockSkew:        DefaultMaxClockSkew,
		TombstoneHorizon:    DefaultTombstoneHorizon,
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
	merge := make(map[string]MergeFunc, len(cfg.Merge))
	for b, fn := range cfg.Merge {
		if err := checkBucket(b); err != nil {
			return cfg, fmt.Errorf("%w: config: merge bucket: %w", ErrInvalid, err)
		}
		if fn == nil || slices.Contains(cfg.FirstWriterWins, b) {
			return cfg, fmt.Errorf("%w: config: merge bucket %q: nil func or also first writer wins", ErrInvalid, b)
		}
		merge[b] = fn
	}
	cfg.Merge = merge
	if cfg.Replicas <= 0 {
		cfg.Replicas = DefaultReplicas
	}
	if cfg.AckTimeout <= 0 {
		cfg.AckTimeout = DefaultAckTimeout
	}
	if cfg.AntiEntropyInterval <= 0 {
		cfg.AntiEntropyInterval = DefaultAntiEntropyInterval
	}
	if cfg.MaxClockSkew < 0 {
		return cfg, fmt.Errorf("%w: config: negative max clock skew %v", ErrInvalid, cfg.MaxClockSkew)
	}
	if cfg.MaxClockSkew == 0 {
		cfg.MaxClockSkew = DefaultMaxClockSkew
	}
	if cfg.TombstoneHorizon <= 0 {
		cfg.TombstoneHorizon = DefaultTombstoneHorizon
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
