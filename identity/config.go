package identity

import (
	"encoding/hex"
	"fmt"
	"log/slog"
	"runtime"
	"strings"
	"time"
)

// Config configures a Service. Start from DefaultConfig, or leave fields
// zero: New fills every zero field with the default documented on it.
type Config struct {
	// Domain is the circle domain (e.g. "ourcircle.net"); required. The token
	// issuer is "https://"+Domain.
	Domain string
	// Secret is the 32-byte circle secret; required. Private signing keys are
	// sealed at rest with AES-256-GCM under
	// HKDF-SHA256(Secret, info "circle identity keys v1").
	Secret []byte

	// SessionTTL is how long a session token is valid. Default 30 days.
	SessionTTL time.Duration
	// KeyRotation is the signing key age after which the maintenance loop
	// started by Start creates a new key. Old public keys keep verifying until
	// created+KeyRotation+SessionTTL. Default 7 days.
	KeyRotation time.Duration

	// MaxConcurrentHashes bounds the argon2 computations in flight (each
	// uses Argon2Memory KiB). Default runtime.NumCPU().
	MaxConcurrentHashes int
	// Argon2Memory is the argon2id memory cost in KiB. Default 19*1024
	// (19 MiB, the OWASP minimum).
	Argon2Memory uint32
	// Argon2Time is the argon2id number of passes. Default 2.
	Argon2Time uint32
	// Argon2Threads is the argon2id parallelism. Default 1.
	Argon2Threads uint8

	// CacheSize bounds the number of verified tokens cached by Verify.
	// Default 10000; negative disables the cache.
	CacheSize int

	// IPFailures is the number of failed logins from one IP address within
	// ThrottleWindow after which that IP is throttled. Default 20.
	IPFailures int
	// AccountFailures is the number of failed logins for one username within
	// ThrottleWindow after which that username is throttled (from every IP).
	// Default 10.
	AccountFailures int
	// ThrottleWindow is the failure counting window; a throttle lasts at most
	// until the end of the window in which it tripped. Default 5 minutes.
	ThrottleWindow time.Duration

	// Node names this node in the stamps of account and invite edits, where
	// it breaks ties between equal times (docs/INTERNALS.md, "Account
	// merge"); caddymodule sets the node name. Default: a random id chosen
	// by New.
	Node string

	// Logger receives the service's logs. Default: discard.
	Logger *slog.Logger
	// Now is the clock. Default time.Now.
	Now func() time.Time
}

// Defaults, see Config.
const (
	DefaultSessionTTL      = 30 * 24 * time.Hour
	DefaultKeyRotation     = 7 * 24 * time.Hour
	DefaultArgon2Memory    = 19 * 1024
	DefaultArgon2Time      = 2
	DefaultArgon2Threads   = 1
	DefaultCacheSize       = 10000
	DefaultIPFailures      = 20
	DefaultAccountFailures = 10
	DefaultThrottleWindow  = 5 * time.Minute
)

// DefaultConfig returns a Config with every default filled in except the
// required Domain and Secret.
func DefaultConfig() Config {
	return Config{
		SessionTTL:          DefaultSessionTTL,
		KeyRotation:         DefaultKeyRotation,
		MaxConcurrentHashes: runtime.NumCPU(),
		Argon2Memory:        DefaultArgon2Memory,
		Argon2Time:          DefaultArgon2Time,
		Argon2Threads:       DefaultArgon2Threads,
		CacheSize:           DefaultCacheSize,
		IPFailures:          DefaultIPFailures,
		AccountFailures:     DefaultAccountFailures,
		ThrottleWindow:      DefaultThrottleWindow,
		Logger:              slog.New(slog.DiscardHandler),
		Now:                 time.Now,
	}
}

// withDefaults fills zero fields and validates the result.
func (c Config) withDefaults() (Config, error) {
	d := DefaultConfig()
	if c.SessionTTL == 0 {
		c.SessionTTL = d.SessionTTL
	}
	if c.KeyRotation == 0 {
		c.KeyRotation = d.KeyRotation
	}
	if c.MaxConcurrentHashes == 0 {
		c.MaxConcurrentHashes = d.MaxConcurrentHashes
	}
	if c.Argon2Memory == 0 {
		c.Argon2Memory = d.Argon2Memory
	}
	if c.Argon2Time == 0 {
		c.Argon2Time = d.Argon2Time
	}
	if c.Argon2Threads == 0 {
		c.Argon2Threads = d.Argon2Threads
	}
	if c.CacheSize == 0 {
		c.CacheSize = d.CacheSize
	}
	if c.IPFailures == 0 {
		c.IPFailures = d.IPFailures
	}
	if c.AccountFailures == 0 {
		c.AccountFailures = d.AccountFailures
	}
	if c.ThrottleWindow == 0 {
		c.ThrottleWindow = d.ThrottleWindow
	}
	if c.Logger == nil {
		c.Logger = d.Logger
	}
	if c.Now == nil {
		c.Now = d.Now
	}
	if c.Node == "" {
		c.Node = hex.EncodeToString(randomBytes(8))
	}

	c.Domain = strings.ToLower(strings.TrimSuffix(strings.TrimSpace(c.Domain), "."))
	switch {
	case c.Domain == "" || strings.ContainsAny(c.Domain, "/:@ \t"):
		return c, fmt.Errorf("identity: config: domain %q is missing or invalid: %w", c.Domain, ErrInvalidInput)
	case len(c.Secret) != 32:
		return c, fmt.Errorf("identity: config: secret must be 32 bytes, got %d: %w", len(c.Secret), ErrInvalidInput)
	case c.SessionTTL < 0, c.KeyRotation < 0, c.ThrottleWindow < 0:
		return c, fmt.Errorf("identity: config: negative duration: %w", ErrInvalidInput)
	case c.MaxConcurrentHashes < 0, c.IPFailures < 0, c.AccountFailures < 0:
		return c, fmt.Errorf("identity: config: negative limit: %w", ErrInvalidInput)
	case c.Argon2Memory < 8*uint32(c.Argon2Threads):
		return c, fmt.Errorf("identity: config: argon2 memory must be at least 8 KiB per thread: %w", ErrInvalidInput)
	}
	return c, nil
}
