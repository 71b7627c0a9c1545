package replicator

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"
)

// Lease defaults.
const (
	DefaultLeaseBucket = "locks"
	DefaultLeaseTTL    = 30 * time.Second
	DefaultLeasePoll   = time.Second
	leaseAckWait       = 5 * time.Second
	leaseSettle        = 150 * time.Millisecond
)

// ErrLeaseNotHeld: the lease is not held by this Leases (never taken,
// released, or lost to another holder).
var ErrLeaseNotHeld = errors.New("replicator: lease not held")

// LeaseConfig configures Leases. Zero values mean the stated default.
type LeaseConfig struct {
	// Bucket holds the leases. Default "locks".
	Bucket string
	// Owner names this holder in lease records. Default: node name + "/" +
	// a random suffix.
	Owner string
	// TTL is how long a lease lasts without a refresh; holders refresh it
	// every third of it. Default 30s.
	TTL time.Duration
	// Poll is how often a waiting Lock looks again. Default 1s.
	Poll time.Duration
	// OnLost, if set, is called (from a background goroutine) when a held
	// lease is lost to another holder.
	OnLost func(name string, err error)
}

// Leases are named locks on the replicated store.
type Leases struct {
	n   *Node
	cfg LeaseConfig

	mu   sync.Mutex // guards held
	held map[string]*heldLease
}

// leaseProcMu serialises taking leases within this process.
var leaseProcMu sync.Mutex

type heldLease struct {
	token string
	stop  chan struct{}
	done  chan struct{}
}

type leaseRecord struct {
	Owner   string    `json:"owner"`
	Token   string    `json:"token"`
	Expires time.Time `json:"expires"`
}

// NewLeases returns the leases of this holder on n.
func NewLeases(n *Node, cfg LeaseConfig) *Leases {
	if cfg.Bucket == "" {
		cfg.Bucket = DefaultLeaseBucket
	}
	if cfg.Owner == "" {
		cfg.Owner = n.Name() + "/" + randomHex(8)
	}
	if cfg.TTL <= 0 {
		cfg.TTL = DefaultLeaseTTL
	}
	if cfg.Poll <= 0 {
		cfg.Poll = DefaultLeasePoll
	}
	return &Leases{n: n, cfg: cfg, held: make(map[string]*heldLease)}
}

// Owner returns this holder's name.
func (l *Leases) Owner() string { return l.cfg.Owner }

// Close stops refreshing every held lease; they then expire.
func (l *Leases) Close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for name, h := range l.held {
		close(h.stop)
		delete(l.held, name)
	}
}

// Held reports whether this holder holds name.
func (l *Leases) Held(name string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	_, ok := l.held[name]
	return ok
}

// Lock waits until it holds name or ctx ends.
func (l *Leases) Lock(ctx context.Context, name string) error {
	poll := time.NewTicker(l.cfg.Poll)
	defer poll.Stop()
	released := make(chan struct{}, 1)
	cancel := l.n.Watch(l.cfg.Bucket, func(r Record) {
		if r.Key == name && r.Deleted {
			select {
			case released <- struct{}{}:
			default:
			}
		}
	})
	defer cancel()
	for {
		ok, err := l.TryLock(ctx, name)
		if err != nil || ok {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for lock %s: %w", name, context.Cause(ctx))
		case <-poll.C:
		case <-released:
		}
	}
}

// TryLock makes one attempt to take name.
func (l *Leases) TryLock(ctx context.Context, name string) (bool, error) {
	if err := ctx.Err(); err != nil {
		return false, err
	}
	if l.Held(name) {
		return false, nil
	}
	token := randomHex(16)
	leaseProcMu.Lock()
	if cur, ok := l.read(name); ok && l.n.cfg.Now().Before(cur.Expires) {
		leaseProcMu.Unlock()
		return false, nil
	}
	err := l.write(ctx, name, token, l.cfg.TTL)
	leaseProcMu.Unlock()
	if err != nil {
		return false, fmt.Errorf("taking lock %s: %w", name, err)
	}
	if len(l.n.alivePeers()) > 0 {
		t := time.NewTimer(leaseSettle)
		select {
		case <-ctx.Done():
			t.Stop()
			return false, ctx.Err()
		case <-t.C:
		}
	}
	if cur, ok := l.read(name); !ok || cur.Token != token {
		return false, nil
	}
	h := &heldLease{token: token, stop: make(chan struct{}), done: make(chan struct{})}
	l.mu.Lock()
	if _, raced := l.held[name]; raced {
		l.mu.Unlock()
		return false, nil
	}
	l.held[name] = h
	l.mu.Unlock()
	go l.refresh(name, h)
	return true, nil
}

// Unlock releases name.
func (l *Leases) Unlock(ctx context.Context, name string) error {
	l.mu.Lock()
	h, ok := l.held[name]
	if ok {
		delete(l.held, name)
		close(h.stop)
	}
	l.mu.Unlock()
	if !ok {
		return fmt.Errorf("unlocking %s: %w", name, ErrLeaseNotHeld)
	}
	<-h.done
	cur, found := l.read(name)
	if !found || cur.Token != h.token {
		return nil
	}
	err := l.n.Delete(ctx, l.cfg.Bucket, name)
	if err != nil && !errors.Is(err, ErrAckTimeout) {
		return fmt.Errorf("unlocking %s: %w", name, err)
	}
	return nil
}

// Renew makes the held lease on name last ttl from now.
func (l *Leases) Renew(ctx context.Context, name string, ttl time.Duration) error {
	l.mu.Lock()
	h, ok := l.held[name]
	l.mu.Unlock()
	if !ok {
		return fmt.Errorf("renewing lock %s: %w", name, ErrLeaseNotHeld)
	}
	return l.write(ctx, name, h.token, max(ttl, l.cfg.TTL))
}

func (l *Leases) refresh(name string, h *heldLease) {
	defer close(h.done)
	t := time.NewTicker(l.cfg.TTL / 3)
	defer t.Stop()
	for {
		select {
		case <-h.stop:
			return
		case <-t.C:
		}
		if cur, ok := l.read(name); ok && cur.Token != h.token {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), l.cfg.TTL/3)
		l.write(ctx, name, h.token, l.cfg.TTL)
		cancel()
	}
}

func (l *Leases) read(name string) (leaseRecord, bool) {
	rec, err := l.n.Get(l.cfg.Bucket, name)
	if err != nil {
		return leaseRecord{}, false
	}
	var lr leaseRecord
	if err := json.Unmarshal(rec.Value, &lr); err != nil {
		return leaseRecord{}, false
	}
	return lr, true
}

func (l *Leases) write(ctx context.Context, name, token string, ttl time.Duration) error {
	b, err := json.Marshal(leaseRecord{Owner: l.cfg.Owner, Token: token, Expires: l.n.cfg.Now().Add(ttl)})
	if err != nil {
		return err
	}
	wctx, cancel := context.WithTimeout(ctx, min(leaseAckWait, ttl/3))
	defer cancel()
	err = l.n.write(wctx, l.cfg.Bucket, name, b, false, math.MaxInt)
	if errors.Is(err, ErrAckTimeout) || (errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil) {
		return nil
	}
	return err
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}
