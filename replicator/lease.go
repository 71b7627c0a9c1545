package replicator

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"sort"
	"strings"
	"sync"
	"time"
)

// Leases: named locks (certmagic's issuance locks) on the replicated store.
//
// A last-writer-wins store cannot give mutual exclusion by itself: two
// takers on the two sides of a fresh split both "win" their own copy. So a
// lease is granted by votes. Every node runs an acceptor (leaseAcceptor,
// started by Open) that grants each lock name to at most one holder at a
// time; a holder holds a lease only while a majority of the circle's voters
// have granted it. The messages are records of the store itself, so they
// use the existing replication and need no new wire message:
//
//	bucket "locks",      key name NUL owner:    the holder's claim (acquire,
//	                                            renew or release; JSON leaseClaim)
//	bucket "lockgrants", key name NUL acceptor: the acceptor's grant (JSON
//	                                            leaseGrant); a tombstone when it
//	                                            has none
//	bucket "lockvoters", key node name:         every node that ever took
//	                                            part in a lock (the voters)
//
// Each of these keys has one writer (the owner, the acceptor, the node
// itself), so last-writer-wins never drops a message between writers; a
// reader only ever needs the latest version of a key.
//
// Time: no wall clock of two nodes is ever compared. An acceptor judges
// its grant live until the lease's TTL has passed on its own monotonic
// clock since it granted (or renewed) it; a grant found on disk after a
// restart counts as given at the restart. A holder counts its lease valid
// until TTL - TTL/20 after it SENT the claim that a majority granted, so it
// stops believing it holds the lease before any granting acceptor can give
// it to someone else (the 5% absorbs clock rate differences, not offsets).
// Config.Now (the wall clock of versions) plays no part. docs/INTERNALS.md
// ("Locks") has the argument and the bounds.

// Lease defaults and buckets.
const (
	DefaultLeaseTTL         = 30 * time.Second
	DefaultLeasePoll        = time.Second
	DefaultLeaseForgetAfter = 24 * time.Hour

	leaseClaims = "locks"      // claims: name NUL owner -> leaseClaim
	leaseGrants = "lockgrants" // grants: name NUL acceptor -> leaseGrant
	leaseVoters = "lockvoters" // voters: node name -> {}

	leaseTick       = time.Second // how often an acceptor notes which voters are alive
	leasePushWindow = time.Minute // how long a claim or grant is pushed to a peer that does not answer
)

// Lease errors.
var (
	// ErrLeaseNotHeld: this Leases does not hold the lease (never taken,
	// released, or lost).
	ErrLeaseNotHeld = errors.New("replicator: lease not held")
	// ErrLeaseLost: the lease expired before it could be renewed (no
	// majority of the voters granted the renewal in time); another holder
	// may have it now.
	ErrLeaseLost = errors.New("replicator: lease lost")
	// ErrNoQuorum: fewer than a majority of the circle's voters granted
	// the lease (or are reachable).
	ErrNoQuorum = errors.New("replicator: no majority for the lease")
)

// LeaseConfig configures Leases. Zero values mean the stated default.
type LeaseConfig struct {
	// Owner names this holder in claims and grants (at most 255 bytes, no
	// NUL). Default: the node name + "/" + a random suffix, so every
	// Leases is its own holder.
	Owner string

	// TTL is how long a lease lasts without a renewal; holders renew it
	// every third of it. Default 30s.
	TTL time.Duration

	// Poll is how often, at most, a waiting Lock tries again (after random
	// waits growing from Poll/4 to Poll, so that racing takers fall out of
	// step); it also wakes when a grant of the name is withdrawn.
	// Default 1s.
	Poll time.Duration

	// ForgetAfter: a voter that this node has not seen alive for this long
	// (counted from the node's start at the earliest) stops counting in
	// the majority, so that a circle that lost a node for good can take
	// locks again. Negative: never. Default 24h.
	ForgetAfter time.Duration

	// OnLost, if set, is called when a held lease is lost (ErrLeaseLost),
	// from the goroutine that noticed (the renewer, Renew or Unlock). It
	// must not block long; it may call the Leases' methods.
	OnLost func(name string, err error)
}

// Leases are the locks of one holder on a Node. Its methods are safe for
// concurrent use.
type Leases struct {
	n   *Node
	cfg LeaseConfig

	mu     sync.Mutex // guards held, trying, used and closed
	held   map[string]*heldLease
	trying map[string]bool // names with a TryLock in flight: one attempt per name at a time
	used   map[string]bool // names this holder wrote a claim for (Close removes them)
	closed bool
}

// heldLease is a lease this holder has. Leases.mu guards its fields
// except rounds.
type heldLease struct {
	// rounds serialises the claims of this lease (renewals, release), so
	// that a later claim has a higher seq and a later send time: a grant
	// counted for a round was then made after that round's claim was sent.
	rounds sync.Mutex

	token      string
	seq        uint64        // last claim sequence sent
	ttl        time.Duration // of the last granted claim
	validUntil time.Time     // monotonic: the lease is ours until then
	stop       chan struct{} // closed to stop the renewer
	done       chan struct{} // closed when the renewer returned
}

// leaseClaim is the value of a claim record.
type leaseClaim struct {
	Owner   string `json:"owner"`
	Token   string `json:"token"`
	Seq     uint64 `json:"seq"`
	TTLms   int64  `json:"ttl_ms"`
	Release bool   `json:"release,omitempty"`
}

// leaseGrant is the value of a grant record.
type leaseGrant struct {
	Owner   string `json:"owner"`
	Token   string `json:"token"`
	Seq     uint64 `json:"seq"`
	TTLms   int64  `json:"ttl_ms"`
	Refused string `json:"refused,omitempty"` // token of the last claim refused while this grant is live
}

// NewLeases returns the leases of one holder on n.
func NewLeases(n *Node, cfg LeaseConfig) *Leases {
	if cfg.Owner == "" {
		cfg.Owner = n.Name() + "/" + randomHex(8)
	}
	cfg.Owner = strings.ReplaceAll(cfg.Owner, "\x00", "")
	if cfg.TTL <= 0 {
		cfg.TTL = DefaultLeaseTTL
	}
	if cfg.Poll <= 0 {
		cfg.Poll = DefaultLeasePoll
	}
	if cfg.ForgetAfter == 0 {
		cfg.ForgetAfter = DefaultLeaseForgetAfter
	}
	return &Leases{n: n, cfg: cfg, held: make(map[string]*heldLease), trying: make(map[string]bool), used: make(map[string]bool)}
}

// Owner returns this holder's name.
func (l *Leases) Owner() string { return l.cfg.Owner }

// Close stops renewing every held lease (they expire after their TTL) and
// makes further TryLock calls fail. It does not release them: a holder
// that is closed while working under a lock keeps others out until then.
// The claims of the names it does not hold are deleted (tombstones), so
// that holders that come and go (every config reload makes one) leave no
// live records behind.
func (l *Leases) Close() {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return
	}
	l.closed = true
	var dones []chan struct{}
	var unused []string
	for name := range l.used {
		if l.held[name] == nil {
			unused = append(unused, name)
		}
	}
	for name, h := range l.held {
		close(h.stop)
		dones = append(dones, h.done)
		delete(l.held, name)
	}
	l.mu.Unlock()
	for _, d := range dones {
		<-d
	}
	for _, name := range unused {
		// A tombstone withdraws only this owner's grants, and this owner
		// holds none of these names and will claim nothing more.
		if err := l.n.writeLease(leaseClaims, name+"\x00"+l.cfg.Owner, nil, true); err != nil && !errors.Is(err, ErrClosed) {
			l.n.log.Debug("removing a lock claim", "lock", name, "error", err)
		}
	}
}

// Held reports whether this holder holds name now (granted by a majority,
// and not yet past its validity).
func (l *Leases) Held(name string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	h := l.held[name]
	return h != nil && time.Now().Before(h.validUntil)
}

// Lock waits until this holder holds name, or ctx ends. It tries again
// after random waits of up to Poll, and soon after a grant of name is
// withdrawn.
func (l *Leases) Lock(ctx context.Context, name string) error {
	released := make(chan struct{}, 1)
	cancel := l.n.Watch(leaseGrants, func(r Record) {
		if r.Deleted && strings.HasPrefix(r.Key, name+"\x00") {
			select {
			case released <- struct{}{}:
			default:
			}
		}
	})
	defer cancel()
	// Takers that race split the votes (each acceptor grants the claim it
	// sees first, its own node's usually) and all give up; a release wakes
	// every waiter at once. Random waits, growing from Poll/4 to Poll,
	// keep them from retrying in step.
	backoff := max(l.cfg.Poll/4, time.Millisecond)
	for {
		ok, err := l.TryLock(ctx, name)
		if err != nil || ok {
			return err
		}
		t := time.NewTimer(backoff/2 + mrand.N(backoff))
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("waiting for lock %s: %w", name, context.Cause(ctx))
		case <-t.C:
		case <-released:
			t.Reset(mrand.N(backoff/2 + 1))
			select {
			case <-ctx.Done():
				t.Stop()
				return fmt.Errorf("waiting for lock %s: %w", name, context.Cause(ctx))
			case <-t.C:
			}
		}
		backoff = min(2*backoff, l.cfg.Poll)
	}
}

// TryLock makes one attempt to take name: true if this holder now holds it
// (a majority of the voters granted it). False with a nil error when
// another holder has it, when the attempt met a concurrent one, or when no
// majority of the voters is reachable (a partition); then nothing of the
// attempt is left standing (it is released). A holder that already holds
// name gets false.
func (l *Leases) TryLock(ctx context.Context, name string) (bool, error) {
	if err := checkLeaseName(name); err != nil {
		return false, err
	}
	if err := ctx.Err(); err != nil {
		return false, err
	}
	// One attempt per name at a time: two attempts of one owner would
	// replace each other's grants (see leaseAcceptor.handle).
	l.mu.Lock()
	_, mine := l.held[name]
	busy := mine || l.trying[name]
	closed := l.closed
	if !busy && !closed {
		l.trying[name] = true
	}
	l.mu.Unlock()
	if closed {
		return false, fmt.Errorf("taking lock %s: leases closed", name)
	}
	if busy {
		return false, nil
	}
	defer func() {
		l.mu.Lock()
		delete(l.trying, name)
		l.mu.Unlock()
	}()
	acc := l.n.acceptor
	if acc == nil {
		return false, ErrClosed
	}
	if g, live := acc.current(name); live && g.Owner != l.cfg.Owner {
		return false, nil // granted to another holder here: no need to ask
	}
	if recs, err := l.n.List(leaseGrants, name+"\x00"); err == nil {
		if g, ok := majorityGrant(recs, name, acc.voters(l.cfg.ForgetAfter)); ok && g.Owner != l.cfg.Owner {
			return false, nil // a majority's grants name another holder
		}
	}
	token := randomHex(16)
	sent, err := l.round(ctx, name, token, 1, l.cfg.TTL)
	if err != nil {
		l.release(name, token, 2)
		if errors.Is(err, ErrNoQuorum) {
			l.n.log.Debug("lock not taken", "lock", name, "error", err)
			return false, nil
		}
		return false, fmt.Errorf("taking lock %s: %w", name, err)
	}
	h := &heldLease{token: token, seq: 1, ttl: l.cfg.TTL, validUntil: sent.Add(validity(l.cfg.TTL)),
		stop: make(chan struct{}), done: make(chan struct{})}
	l.mu.Lock()
	if _, raced := l.held[name]; raced || l.closed {
		l.mu.Unlock()
		l.release(name, token, 2)
		return false, nil
	}
	l.held[name] = h
	l.mu.Unlock()
	if prev, ok := acc.takenOver(name, token); ok {
		l.n.log.Info("taking over expired lock", "lock", name, "previous_owner", prev, "owner", l.cfg.Owner)
	}
	go l.renewer(name, h)
	return true, nil
}

// Renew makes the held lease on name last max(ttl, TTL) from now (and
// keeps renewing it). It is an error wrapping ErrLeaseNotHeld or
// ErrLeaseLost if this holder does not hold it (then nothing is written
// that could touch another holder's lease), and one wrapping ErrNoQuorum
// if no majority granted the renewal (the lease stays held until its
// current validity ends, unless a later renewal succeeds).
func (l *Leases) Renew(ctx context.Context, name string, ttl time.Duration) error {
	ttl = max(ttl, l.cfg.TTL)
	l.mu.Lock()
	h := l.held[name]
	if h == nil {
		l.mu.Unlock()
		return fmt.Errorf("renewing lock %s: %w", name, ErrLeaseNotHeld)
	}
	l.mu.Unlock()
	h.rounds.Lock()
	defer h.rounds.Unlock()
	l.mu.Lock()
	if l.held[name] != h { // unlocked or lost meanwhile
		l.mu.Unlock()
		return fmt.Errorf("renewing lock %s: %w", name, ErrLeaseNotHeld)
	}
	h.seq++
	seq := h.seq
	l.mu.Unlock()
	if l.lostIfExpired(name, h) {
		return fmt.Errorf("renewing lock %s: %w", name, ErrLeaseLost)
	}
	sent, err := l.round(ctx, name, h.token, seq, ttl)
	if err != nil {
		return fmt.Errorf("renewing lock %s: %w", name, err)
	}
	l.extend(h, sent, ttl)
	return nil
}

// Unlock releases name if this holder holds it: an error wrapping
// ErrLeaseNotHeld or ErrLeaseLost otherwise, and nothing is written then.
// The release reaches the acceptors in the background; waiters on other
// nodes take the lock once their acceptors have seen it.
func (l *Leases) Unlock(ctx context.Context, name string) error {
	l.mu.Lock()
	h := l.held[name]
	l.mu.Unlock()
	if h == nil {
		return fmt.Errorf("unlocking %s: %w", name, ErrLeaseNotHeld)
	}
	// Under h.rounds, so that no renewal of this lease is written after
	// the release (it would grant it again), and the lease is dropped from
	// held only then (a new TryLock of this owner must come after both).
	h.rounds.Lock()
	l.mu.Lock()
	if l.held[name] != h { // lost or unlocked while we waited
		l.mu.Unlock()
		h.rounds.Unlock()
		return fmt.Errorf("unlocking %s: %w", name, ErrLeaseNotHeld)
	}
	delete(l.held, name)
	close(h.stop)
	expired := !time.Now().Before(h.validUntil)
	seq := h.seq + 1
	l.mu.Unlock()
	var err error
	if expired {
		l.reportLost(name)
		err = fmt.Errorf("unlocking %s: %w", name, ErrLeaseLost)
	} else if rerr := l.release(name, h.token, seq); rerr != nil {
		err = fmt.Errorf("unlocking %s: %w", name, rerr)
	}
	h.rounds.Unlock()
	<-h.done
	return err
}

// renewer renews h every third of its TTL until stopped, and declares it
// lost when its validity ends without a successful renewal.
func (l *Leases) renewer(name string, h *heldLease) {
	defer close(h.done)
	for {
		l.mu.Lock()
		every, until := h.ttl/3, h.validUntil
		l.mu.Unlock()
		tick := time.NewTimer(every)
		expiry := time.NewTimer(time.Until(until))
		select {
		case <-h.stop:
			tick.Stop()
			expiry.Stop()
			return
		case <-expiry.C:
			tick.Stop()
			h.rounds.Lock()
			lost := l.lostIfExpired(name, h)
			h.rounds.Unlock()
			if lost {
				return
			}
			continue
		case <-tick.C:
			expiry.Stop()
		}
		h.rounds.Lock()
		select {
		case <-h.stop: // unlocked or closed while we waited: write nothing more
			h.rounds.Unlock()
			return
		default:
		}
		l.mu.Lock()
		h.seq++
		seq, ttl := h.seq, h.ttl
		l.mu.Unlock()
		ctx, cancel := context.WithCancel(context.Background())
		go func() {
			select {
			case <-h.stop:
			case <-ctx.Done():
			}
			cancel()
		}()
		sent, err := l.round(ctx, name, h.token, seq, ttl)
		cancel()
		h.rounds.Unlock()
		if err == nil {
			l.extend(h, sent, ttl)
		} else {
			l.n.log.Debug("lock renewal not granted", "lock", name, "error", err)
		}
	}
}

// extend moves h's validity to sent + validity(ttl) if that is later.
func (l *Leases) extend(h *heldLease, sent time.Time, ttl time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	h.ttl = ttl
	if v := sent.Add(validity(ttl)); v.After(h.validUntil) {
		h.validUntil = v
	}
}

// lostIfExpired drops h and reports the loss if its validity has ended.
// The caller holds h.rounds.
func (l *Leases) lostIfExpired(name string, h *heldLease) bool {
	l.mu.Lock()
	if time.Now().Before(h.validUntil) {
		l.mu.Unlock()
		return false
	}
	cur := l.held[name] == h
	if cur {
		delete(l.held, name)
	}
	seq := h.seq + 1
	l.mu.Unlock()
	if cur {
		l.reportLost(name)
		l.release(name, h.token, seq) // frees acceptors that still grant us
	}
	return true
}

func (l *Leases) reportLost(name string) {
	l.n.log.Warn("lock lease lost: no majority renewed it in time", "lock", name, "owner", l.cfg.Owner)
	if l.cfg.OnLost != nil {
		l.cfg.OnLost(name, fmt.Errorf("lock %s: %w", name, ErrLeaseLost))
	}
}

// validity is how long after sending a granted claim the holder counts
// the lease as its own: ttl less 5% for clock rate differences.
func validity(ttl time.Duration) time.Duration { return ttl - ttl/20 }

// round sends a claim (token, seq, ttl) for name and waits until a majority
// of the voters granted it. It returns when the claim was sent (the start
// of the lease's validity), or an error wrapping ErrNoQuorum if no
// majority granted it within min(ttl/3, Config.AckTimeout).
func (l *Leases) round(ctx context.Context, name, token string, seq uint64, ttl time.Duration) (time.Time, error) {
	n := l.n
	acc := n.acceptor
	acc.register()
	voters := acc.voters(l.cfg.ForgetAfter)
	need := len(voters)/2 + 1
	reachable := 1
	for _, p := range n.alivePeers() {
		if voters[p.Name] {
			reachable++
		}
	}
	if reachable < need {
		return time.Time{}, fmt.Errorf("%w: %d of %d voters reachable, %d needed", ErrNoQuorum, reachable, len(voters), need)
	}
	changed := make(chan struct{}, 1)
	cancel := n.Watch(leaseGrants, func(r Record) {
		if strings.HasPrefix(r.Key, name+"\x00") {
			select {
			case changed <- struct{}{}:
			default:
			}
		}
	})
	defer cancel()
	claim, _ := json.Marshal(leaseClaim{Owner: l.cfg.Owner, Token: token, Seq: seq, TTLms: ttl.Milliseconds()})
	l.mu.Lock()
	l.used[name] = true
	l.mu.Unlock()
	sent := time.Now()
	if err := n.writeLease(leaseClaims, name+"\x00"+l.cfg.Owner, claim, false); err != nil {
		return time.Time{}, err
	}
	timer := time.NewTimer(min(ttl/3, n.cfg.AckTimeout))
	defer timer.Stop()
	granted := 0
	for {
		var refused int
		granted, refused = l.countGrants(name, token, seq, voters)
		if granted >= need {
			return sent, nil
		}
		if len(voters)-refused < need {
			return time.Time{}, fmt.Errorf("%w: %d of %d voters refused it (granted to another holder), %d needed", ErrNoQuorum, refused, len(voters), need)
		}
		select {
		case <-changed:
		case <-timer.C:
			return time.Time{}, fmt.Errorf("%w: %d of %d voters granted it, %d needed", ErrNoQuorum, granted, len(voters), need)
		case <-ctx.Done():
			return time.Time{}, ctx.Err()
		case <-n.ctx.Done():
			return time.Time{}, ErrClosed
		}
	}
}

// countGrants counts the voters whose grant of name is (token, seq or
// later), and those that refused token (they grant another holder).
func (l *Leases) countGrants(name, token string, seq uint64, voters map[string]bool) (granted, refused int) {
	recs, err := l.n.List(leaseGrants, name+"\x00")
	if err != nil {
		return 0, 0
	}
	for _, r := range recs {
		acceptor := strings.TrimPrefix(r.Key, name+"\x00")
		var g leaseGrant
		if !voters[acceptor] || json.Unmarshal(r.Value, &g) != nil {
			continue
		}
		switch {
		case g.Owner == l.cfg.Owner && g.Token == token && g.Seq >= seq:
			granted++
		case g.Token != token && g.Refused == token:
			refused++
		}
	}
	return granted, refused
}

// release sends a release claim for (name, token); acceptors that grant
// exactly that token withdraw their grant, others ignore it.
func (l *Leases) release(name, token string, seq uint64) error {
	claim, _ := json.Marshal(leaseClaim{Owner: l.cfg.Owner, Token: token, Seq: seq, Release: true})
	return l.n.writeLease(leaseClaims, name+"\x00"+l.cfg.Owner, claim, false)
}

// checkLeaseName validates a lock name.
func checkLeaseName(name string) error {
	if name == "" || strings.Contains(name, "\x00") || len(name) > MaxKeyLen-maxNodeName-1 {
		return fmt.Errorf("%w: lock name must be 1 to %d bytes without NUL", ErrInvalid, MaxKeyLen-maxNodeName-1)
	}
	return nil
}

// writeLease stores a claim, grant or voter record here and pushes it to
// every alive peer at once (streams, retried for leasePushWindow), without
// waiting: the grants are the acknowledgement that matters.
func (n *Node) writeLease(bucket, key string, value []byte, deleted bool) error {
	if err := checkKey(bucket, key); err != nil {
		return err
	}
	if !n.enter() {
		return ErrClosed
	}
	defer n.wg.Done()
	rec, stored, err := n.writeLocal(bucket, key, value, deleted)
	if err != nil || !stored {
		return err
	}
	n.broadcast(rec)
	msg := encodeRecords(msgReplicate, []Record{rec})
	for _, p := range n.alivePeers() {
		n.wg.Add(1)
		go func() {
			defer n.wg.Done()
			ctx, cancel := context.WithTimeout(n.ctx, leasePushWindow)
			defer cancel()
			if err := n.replicateTo(ctx, p, msg, 1); err != nil {
				n.log.Debug("lease record not pushed; anti-entropy will bring it", "peer", p.Name, "key", key, "error", err)
			}
		}()
	}
	return nil
}

// LeaseInfo is a held lock as this node sees it.
type LeaseInfo struct {
	Name  string
	Owner string // the holder a majority of the voters grant it to
	// Remaining is what is left of this node's own grant of it by this
	// node's clock, or the lease's TTL if this node is not among the
	// granting voters.
	Remaining time.Duration
}

// Locks lists the locks held in the circle as this node sees them: those
// that a majority of the voters' grant records (as replicated here) give
// to one holder, sorted by name. Acceptors withdraw their grants when they
// expire, so a crashed holder's lock leaves the list after its TTL.
func (n *Node) Locks() []LeaseInfo {
	a := n.acceptor
	if a == nil {
		return nil
	}
	recs, err := n.List(leaseGrants, "")
	if err != nil {
		return nil
	}
	voters := a.voters(DefaultLeaseForgetAfter)
	names := map[string]bool{}
	for _, r := range recs {
		if name, _, ok := strings.Cut(r.Key, "\x00"); ok {
			names[name] = true
		}
	}
	var out []LeaseInfo
	now := time.Now()
	for name := range names {
		g, ok := majorityGrant(recs, name, voters)
		if !ok {
			continue
		}
		info := LeaseInfo{Name: name, Owner: g.Owner, Remaining: time.Duration(g.TTLms) * time.Millisecond}
		a.mu.Lock()
		if mine := a.grants[name]; mine != nil && mine.Token == g.Token {
			info.Remaining = mine.ttl - now.Sub(mine.at)
		}
		a.mu.Unlock()
		out = append(out, info)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// majorityGrant returns the grant of name that a majority of voters give
// to one token, among recs (grant records, any names).
func majorityGrant(recs []Record, name string, voters map[string]bool) (leaseGrant, bool) {
	count := map[string]int{}
	for _, r := range recs {
		n, acceptor, ok := strings.Cut(r.Key, "\x00")
		var g leaseGrant
		if !ok || n != name || !voters[acceptor] || json.Unmarshal(r.Value, &g) != nil {
			continue
		}
		count[g.Token]++
		if count[g.Token] >= len(voters)/2+1 {
			return g, true
		}
	}
	return leaseGrant{}, false
}

// leaseAcceptor grants each lock name to at most one holder at a time (see
// the top of this file). One per Node, started by Open; it runs in its own
// goroutine, fed by a Watch of the claims bucket.
type leaseAcceptor struct {
	n       *Node
	started time.Time
	wake    chan struct{} // capacity 1: queue is not empty

	// qmu guards queue; the Watch callback only takes qmu, so a grant
	// being stored (fsync, under mu) never holds up the node's watchers.
	qmu   sync.Mutex
	queue []Record // claims to process, in commit order

	mu         sync.Mutex // guards the following
	grants     map[string]*acceptedGrant
	lastAlive  map[string]time.Time // voter -> last seen alive (monotonic)
	registered bool                 // this node is in "lockvoters" (register)
	expired    map[string]string    // lock name -> owner whose grant expired unreleased
	tookOver   map[string][2]string // lock name -> {token granted next, that previous owner}
}

// acceptedGrant is a grant in force at this acceptor.
type acceptedGrant struct {
	leaseGrant
	ttl time.Duration
	at  time.Time // monotonic: when granted or last renewed here
}

func (g *acceptedGrant) live(now time.Time) bool { return now.Sub(g.at) < g.ttl }

// newLeaseAcceptor makes the acceptor of n, loads the grants it stored
// before and subscribes it to claims (before any can arrive); run
// processes them.
func newLeaseAcceptor(n *Node) *leaseAcceptor {
	a := &leaseAcceptor{n: n, started: time.Now(), wake: make(chan struct{}, 1),
		grants: make(map[string]*acceptedGrant), lastAlive: make(map[string]time.Time),
		expired: make(map[string]string), tookOver: make(map[string][2]string)}
	a.load()
	n.Watch(leaseClaims, func(r Record) {
		a.qmu.Lock()
		a.queue = append(a.queue, r)
		a.qmu.Unlock()
		select {
		case a.wake <- struct{}{}:
		default:
		}
	})
	return a
}

// run processes claims, notes which voters are alive and withdraws
// expired grants until the node closes. The caller did n.wg.Add(1).
func (a *leaseAcceptor) run() {
	n := a.n
	defer n.wg.Done()
	tick := time.NewTicker(leaseTick)
	defer tick.Stop()
	expire := time.NewTimer(leaseTick)
	defer expire.Stop()
	for {
		expire.Reset(a.withdrawExpired())
		select {
		case <-n.ctx.Done():
			return
		case <-tick.C:
			a.noteAlive()
		case <-expire.C:
		case <-a.wake:
			for {
				a.qmu.Lock()
				batch := a.queue
				a.queue = nil
				a.qmu.Unlock()
				if len(batch) == 0 {
					break
				}
				for _, r := range batch {
					a.handle(r)
				}
			}
		}
	}
}

// register records this node in "lockvoters" once, when locks are first
// used in the circle (its first claim, made or received), so that nodes
// that never use locks store nothing for them.
func (a *leaseAcceptor) register() {
	a.mu.Lock()
	done := a.registered
	a.registered = true
	a.mu.Unlock()
	if done {
		return
	}
	n := a.n
	if _, err := n.Get(leaseVoters, n.cfg.Name); errors.Is(err, ErrNotFound) {
		if err := n.writeLease(leaseVoters, n.cfg.Name, []byte("{}"), false); err != nil && !errors.Is(err, ErrClosed) {
			n.log.Error("registering as a lock voter", "error", err)
		}
	}
}

// load takes over the grants this node stored before a restart, counting
// them as given now (the conservative reading: their holder may still
// hold them).
func (a *leaseAcceptor) load() {
	recs, err := a.n.List(leaseGrants, "")
	if err != nil {
		return
	}
	now := time.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, r := range recs {
		name, acceptor, ok := strings.Cut(r.Key, "\x00")
		var g leaseGrant
		if !ok || acceptor != a.n.cfg.Name || json.Unmarshal(r.Value, &g) != nil {
			continue
		}
		a.grants[name] = &acceptedGrant{leaseGrant: g, ttl: time.Duration(g.TTLms) * time.Millisecond, at: now}
	}
}

// withdrawExpired withdraws the grants that expired here, so that the
// replicated grant records (Locks, TryLock's first look) show only live
// locks; a late renewal of one is simply granted again (the name is
// free). It returns how long until the next grant expires (at most
// leaseTick).
func (a *leaseAcceptor) withdrawExpired() time.Duration {
	now := time.Now()
	next := leaseTick
	a.mu.Lock()
	defer a.mu.Unlock()
	for name, g := range a.grants {
		if left := g.ttl - now.Sub(g.at); left > 0 {
			next = min(next, left)
			continue
		}
		delete(a.grants, name)
		a.expired[name] = g.Owner
		a.n.log.Info("lock lease expired without release", "lock", name, "owner", g.Owner)
		a.store(name, nil)
	}
	return next
}

// takenOver returns the owner whose unreleased, expired grant of name this
// acceptor replaced by its grant of token, if any.
func (a *leaseAcceptor) takenOver(name, token string) (string, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	t := a.tookOver[name]
	if t[0] != token {
		return "", false
	}
	delete(a.tookOver, name)
	return t[1], true
}

// noteAlive records which voters are alive now.
func (a *leaseAcceptor) noteAlive() {
	now := time.Now()
	ms := a.n.Members()
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, m := range ms {
		if m.State == "alive" || m.State == "suspect" {
			a.lastAlive[m.Name] = now
		}
	}
}

// voters returns the circle's voters: every node registered in
// "lockvoters" or known as a member, this one included, less those not
// seen alive for forget (if positive).
func (a *leaseAcceptor) voters(forget time.Duration) map[string]bool {
	n := a.n
	out := map[string]bool{n.cfg.Name: true}
	if recs, err := n.List(leaseVoters, ""); err == nil {
		for _, r := range recs {
			out[r.Key] = true
		}
	}
	for _, m := range n.Members() {
		out[m.Name] = true
	}
	a.noteAlive()
	if forget > 0 {
		now := time.Now()
		a.mu.Lock()
		for name := range out {
			seen, ok := a.lastAlive[name]
			if !ok {
				seen = a.started
			}
			if name != n.cfg.Name && now.Sub(seen) > forget {
				delete(out, name)
			}
		}
		a.mu.Unlock()
	}
	return out
}

// current returns this acceptor's grant of name and whether it is live.
func (a *leaseAcceptor) current(name string) (leaseGrant, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	g := a.grants[name]
	if g == nil {
		return leaseGrant{}, false
	}
	return g.leaseGrant, g.live(time.Now())
}

// handle applies one claim record. A claim is granted unless another
// owner's grant of the name is live here. A claim of a new token by the
// owner already granted replaces its grant: an owner claims a new token
// only once it holds the old one no more (unlocked, lost or failed), and
// the claim may have overwritten the old token's release before this node
// saw it (one key per owner, last writer wins).
func (a *leaseAcceptor) handle(r Record) {
	n := a.n
	a.register()
	name, owner, ok := strings.Cut(r.Key, "\x00")
	if !ok || name == "" {
		// The previous release stored leases under the bare lock name:
		// only seen in a circle that is being upgraded.
		n.log.Debug("ignoring a lock record without an owner in its key", "key", r.Key)
		return
	}
	var c leaseClaim
	if !r.Deleted {
		if err := json.Unmarshal(r.Value, &c); err != nil || c.Owner != owner || c.Token == "" {
			n.log.Warn("ignoring a malformed lock claim", "lock", name, "from", r.Version.Node)
			return
		}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	g := a.grants[name]
	now := time.Now()
	switch {
	case r.Deleted || c.Release:
		if g == nil || g.Owner != owner || (!r.Deleted && g.Token != c.Token) {
			return // not ours to withdraw
		}
		delete(a.grants, name)
		delete(a.expired, name)
		delete(a.tookOver, name)
		a.store(name, nil)
	case g != nil && g.Token != c.Token && g.Owner != owner && g.live(now):
		// Refused: say so in the grant record (the grant itself is
		// unchanged), so the claimant gives up at once instead of
		// waiting for its round to time out.
		n.log.Debug("lock claim refused: granted to another holder", "lock", name, "claimant", owner, "holder", g.Owner)
		g.Refused = c.Token
		a.store(name, &g.leaseGrant)
	case g != nil && g.Token == c.Token && c.Seq <= g.Seq:
		// an old claim of the lease already granted
	case c.TTLms <= 0:
		n.log.Warn("ignoring a lock claim without a TTL", "lock", name, "from", owner)
	default:
		ng := &acceptedGrant{leaseGrant: leaseGrant{Owner: c.Owner, Token: c.Token, Seq: c.Seq, TTLms: c.TTLms},
			ttl: time.Duration(c.TTLms) * time.Millisecond, at: now}
		a.grants[name] = ng
		if prev, ok := a.expired[name]; ok && prev != owner {
			a.tookOver[name] = [2]string{c.Token, prev}
		}
		if g != nil && g.Owner != owner && !g.live(now) {
			a.tookOver[name] = [2]string{c.Token, g.Owner}
		}
		delete(a.expired, name)
		a.store(name, &ng.leaseGrant)
	}
}

// store writes this acceptor's grant of name (nil: a tombstone). a.mu is
// held, so grants are stored in decision order.
func (a *leaseAcceptor) store(name string, g *leaseGrant) {
	key := name + "\x00" + a.n.cfg.Name
	var err error
	if g == nil {
		err = a.n.writeLease(leaseGrants, key, nil, true)
	} else {
		b, _ := json.Marshal(g)
		err = a.n.writeLease(leaseGrants, key, b, false)
	}
	if err != nil && !errors.Is(err, ErrClosed) {
		a.n.log.Error("storing a lock grant", "lock", name, "error", err)
	}
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}
