package identity

import (
	"context"
	"crypto/cipher"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// Bucket names (see docs/INTERNALS.md).
const (
	bucketAccounts    = "accounts"    // account id -> accountRecord JSON
	bucketUsernames   = "usernames"   // normalised username -> account id (first writer wins)
	bucketSessions    = "sessions"    // session id -> sessionRecord JSON
	bucketRevocations = "revocations" // "sid:<sid>" -> {"exp"}; "acct:<id>" -> {"before"}
	bucketKeys        = "keys"        // kid -> keyRecord JSON
	bucketInvites     = "invites"     // hex(sha256(token)) -> inviteRecord JSON
	bucketThrottle    = "throttle"    // "ip:<ip>" / "acct:<username>" -> throttleRecord JSON
)

// Service is the circle's identity provider: accounts, passwords, invites,
// session tokens, signing keys and revocation, on top of a Store. All methods
// are safe for concurrent use.
type Service struct {
	store  Store
	cfg    Config
	log    *slog.Logger
	issuer string
	hasher *hasher
	seal   cipher.AEAD // seals private signing keys
	cache  *tokenCache
	thr    *throttler

	keysMu  sync.RWMutex // guards the following
	keys    map[string]*sigKey
	signing *sigKey // newest key with a private half, nil if none
	jwks    []byte

	stateMu       sync.RWMutex               // guards the following (in-memory views of replicated state)
	revokedSIDs   map[string]time.Time       // session id -> token expiry
	revokedBefore map[string]time.Time       // account id -> tokens issued up to this second are revoked (legacy records only)
	accounts      map[string]acctView        // account id -> what Verify needs
	byName        map[string]map[string]bool // username -> ids of accounts whose record carries it

	writeMu sync.Mutex // serialises this node's account and username writes (read-modify-write)

	inviteMu    sync.Mutex // guards invitesBusy
	invitesBusy map[string]bool

	renameMu  sync.Mutex      // guards renameQ
	renameQ   map[string]bool // account ids to check for a username collision
	renameSig chan struct{}   // cap 1: renameQ is non-empty

	running atomic.Bool // Start has completed and Close has not been called

	pruneMu   sync.Mutex // guards lastPrune and lastSweep
	lastPrune time.Time
	lastSweep time.Time // of the throttle bucket

	runMu   sync.Mutex // guards the following (and serialises Start and Close)
	stop    chan struct{}
	wg      sync.WaitGroup
	cancels []func()
}

// acctView is the part of an account Verify needs, kept in memory.
type acctView struct {
	username, name, email string
	groups                []string
	disabled              bool
	sessionGen            uint64 // tokens and sessions of a lower generation are revoked
}

// New returns a Service on store. cfg's zero fields take their defaults;
// Domain and a 32-byte Secret are required. Call Start before issuing or
// verifying sessions.
func New(store Store, cfg Config) (*Service, error) {
	if store == nil {
		return nil, fmt.Errorf("identity: nil store: %w", ErrInvalidInput)
	}
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	aead, err := deriveSealAEAD(cfg.Secret)
	if err != nil {
		return nil, fmt.Errorf("identity: %w", err)
	}
	s := &Service{
		store:         store,
		cfg:           cfg,
		log:           cfg.Logger,
		issuer:        "https://" + cfg.Domain,
		hasher:        newHasher(cfg),
		seal:          aead,
		cache:         newTokenCache(cfg.CacheSize),
		thr:           newThrottler(cfg),
		keys:          make(map[string]*sigKey),
		revokedSIDs:   make(map[string]time.Time),
		revokedBefore: make(map[string]time.Time),
		accounts:      make(map[string]acctView),
		byName:        make(map[string]map[string]bool),
		invitesBusy:   make(map[string]bool),
		renameQ:       make(map[string]bool),
		renameSig:     make(chan struct{}, 1),
	}
	return s, nil
}

// Issuer returns the token issuer, "https://" + the circle domain.
func (s *Service) Issuer() string { return s.issuer }

// Start loads the key set, revocations and accounts from the store, watches
// those buckets (plus usernames and throttle) for changes from other nodes,
// creates a signing key if there is none it can use, and starts the
// maintenance loop (key rotation, pruning) and the username-collision
// worker. It returns once a signing key is usable. The goroutines run until
// Close; ctx only bounds Start itself. A closed Service may be started
// again.
func (s *Service) Start(ctx context.Context) error {
	s.runMu.Lock()
	defer s.runMu.Unlock()
	if s.running.Load() {
		return errors.New("identity: already started")
	}
	stop := make(chan struct{})
	// Watch first, then load: an event racing the load is applied twice,
	// which is harmless, instead of being lost.
	cancels := []func(){
		s.store.Watch(bucketKeys, s.onKeyEvent),
		s.store.Watch(bucketRevocations, s.onRevocationEvent),
		s.store.Watch(bucketAccounts, s.onAccountEvent),
		s.store.Watch(bucketUsernames, s.onUsernameEvent),
		s.store.Watch(bucketThrottle, s.onThrottleEvent),
	}
	fail := func(err error) error {
		for _, c := range cancels {
			c()
		}
		return err
	}
	if err := s.loadKeys(); err != nil {
		return fail(fmt.Errorf("identity: starting: %w", err))
	}
	if err := s.loadRevocations(); err != nil {
		return fail(fmt.Errorf("identity: starting: %w", err))
	}
	if err := s.loadAccounts(); err != nil {
		return fail(fmt.Errorf("identity: starting: %w", err))
	}
	// Rotate if there is no key we can sign with, or the newest is due
	// (this node was down when it should have rotated).
	if sk, err := s.signingKey(); err != nil || !s.cfg.Now().Before(sk.created.Add(s.cfg.KeyRotation)) {
		if _, err := s.RotateKey(ctx); err != nil {
			if _, serr := s.signingKey(); serr != nil {
				return fail(fmt.Errorf("identity: starting: %w", err))
			}
			s.log.Warn("first signing key not acknowledged by replicas yet", "error", err)
		}
	}
	s.stop = stop
	s.cancels = cancels
	s.running.Store(true)
	s.wg.Add(2)
	go s.maintenanceLoop(stop)
	go s.renameWorker(stop)
	return nil
}

// Close stops the goroutines and watches started by Start. It does not close
// the store. It is idempotent.
func (s *Service) Close() error {
	s.runMu.Lock()
	defer s.runMu.Unlock()
	if !s.running.Load() {
		return nil
	}
	s.running.Store(false)
	for _, c := range s.cancels {
		c()
	}
	close(s.stop)
	s.wg.Wait()
	s.cancels = nil
	return nil
}

// maintenanceInterval is how often the maintenance loop runs.
func (s *Service) maintenanceInterval() time.Duration {
	d := time.Minute
	if q := s.cfg.KeyRotation / 4; q < d {
		d = q
	}
	return max(d, time.Second)
}

func (s *Service) maintenanceLoop(stop chan struct{}) {
	defer s.wg.Done()
	t := time.NewTicker(s.maintenanceInterval())
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		go func() { // abandon store waits when stopping
			select {
			case <-stop:
				cancel()
			case <-ctx.Done():
			}
		}()
		s.maintain(ctx)
		cancel()
	}
}

// pruneInterval is how often maintain prunes old records.
const pruneInterval = time.Hour

// maxPrunePerRun bounds the record deletions of one pruning pass per
// bucket (each is an acknowledged write).
const maxPrunePerRun = 1000

// maintain rotates the signing key when it is older than KeyRotation and,
// at most every pruneInterval, prunes state that can no longer matter
// (retired keys, revocations and sessions past their expiry, old invites,
// finished throttle windows, every half window: sweepThrottle).
func (s *Service) maintain(ctx context.Context) {
	now := s.cfg.Now()
	s.keysMu.RLock()
	sk := s.signing
	s.keysMu.RUnlock()
	if sk == nil || !now.Before(sk.created.Add(s.cfg.KeyRotation)) {
		if _, err := s.RotateKey(ctx); err != nil {
			s.log.Warn("rotating signing key", "error", err)
		}
	}
	s.pruneKeys(ctx, now) // cheap (in memory); keeps the JWKS current
	s.thr.prune(now)
	s.sweepThrottle(ctx, now)
	s.pruneMu.Lock()
	due := s.lastPrune.IsZero() || !now.Before(s.lastPrune.Add(pruneInterval)) || now.Before(s.lastPrune)
	if due {
		s.lastPrune = now
	}
	s.pruneMu.Unlock()
	if due {
		s.pruneRevocations(ctx, now)
		s.pruneSessions(ctx, now)
		s.pruneInvites(ctx, now)
	}
}

// FirstWriterWinsBuckets returns the buckets the replicated store must
// treat as first-writer-wins (between two live records the earlier version
// wins): the usernames index.
func FirstWriterWinsBuckets() []string { return []string{bucketUsernames} }

// decodeJSON unmarshals a stored value, wrapping errors with what it was.
func decodeJSON(what string, b []byte, v any) error {
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("identity: decoding %s: %w", what, err)
	}
	return nil
}

// bgCtx is for best-effort clean-up writes that must not be cut short by
// the caller's cancelled context.
func bgCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
}
