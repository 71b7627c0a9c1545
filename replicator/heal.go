package replicator

import (
	"context"
	"encoding/json"
	"log/slog"
	"math/rand/v2"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Healing (docs/INTERNALS.md, "Healing after a split"). memberlist gossips
// to a dead node only for GossipToTheDeadTime and then never contacts it
// again, so two parts of a circle that were apart longer stay apart. A node
// therefore keeps trying, forever and with backoff, every target it is not
// in contact with:
//   - every member it has ever known (not alive for memberlist now), at its
//     last known address; those are persisted in the meta bucket, so a
//     restarted node remembers them;
//   - every Join seed, resolved again at every attempt (a host name may now
//     point elsewhere), unless one of its addresses is a live member's or
//     this node's own.
//
// An attempt is a memberlist Join (a push/pull of the member lists) from
// this node, whatever else it is in contact with: that is what merges two
// halves that both have live members. memberlist forgets a dead node once
// GossipToTheDeadTime has passed, so after a long split the members of the
// other half are new to each side and one exchange merges the lists; after
// a shorter one memberlist's own gossip to the dead still reaches them.

const (
	healTick           = 500 * time.Millisecond // how often the heal loop looks at its targets
	healMinBackoff     = 250 * time.Millisecond // first retry of a target
	healMaxBackoff     = 15 * time.Second       // retries never space out more than this
	healResolveTimeout = 5 * time.Second        // bound of one seed's name resolution
	// healSeedRecheck is how often a seed that resolves to a live member is
	// resolved again (its name may move to a new address).
	healSeedRecheck = healMaxBackoff
)

// healTarget is the retry state of one target (a member by name or a seed).
// healer.mu guards it.
type healTarget struct {
	backoff  time.Duration // wait after the next attempt
	next     time.Time     // no attempt before this
	failures int           // attempts in a row that reached nothing
	busy     bool          // an attempt is in flight
}

// healer is the Node's heal state.
type healer struct {
	mu      sync.Mutex             // guards targets
	targets map[string]*healTarget // by "member NAME" or "seed SEED"
}

// target returns the retry state of key, created ready to go.
func (h *healer) target(key string) *healTarget {
	t := h.targets[key]
	if t == nil {
		t = &healTarget{backoff: healMinBackoff}
		h.targets[key] = t
	}
	return t
}

// healLoop runs the heal attempts until Close, and saves the known
// members when they changed.
func (n *Node) healLoop() {
	defer n.wg.Done()
	tick := time.NewTicker(healTick)
	defer tick.Stop()
	for {
		n.healRound()
		n.saveKnown()
		select {
		case <-n.ctx.Done():
			n.saveKnown()
			return
		case <-tick.C:
		}
	}
}

// healRound starts an attempt for every target that is due.
func (n *Node) healRound() {
	live := n.liveNodes()
	now := time.Now()
	members := map[string]string{}
	n.membersMu.Lock()
	for name, addr := range n.known {
		if name != n.cfg.Name && !live[name] { // (a data dir once used under another name may list this one)
			members["member "+name] = addr
		}
	}
	n.membersMu.Unlock()

	h := &n.heal
	h.mu.Lock()
	defer h.mu.Unlock()
	for key := range h.targets {
		if _, ok := members[key]; !ok && !h.targets[key].busy && strings.HasPrefix(key, "member ") {
			delete(h.targets, key) // alive again: the next loss starts with fast retries
		}
	}
	start := func(key string, attempt func() (reached, done bool)) {
		t := h.target(key)
		if t.busy || now.Before(t.next) {
			return
		}
		t.busy = true
		n.wg.Add(1)
		go func() {
			defer n.wg.Done()
			reached, done := attempt()
			n.healDone(key, reached, done)
		}()
	}
	for key, addr := range members {
		name := key[len("member "):]
		start(key, func() (bool, bool) { return n.reachMember(name, addr) })
	}
	for _, seed := range n.cfg.Join {
		start("seed "+seed, func() (bool, bool) { return n.reachSeed(seed) })
	}
}

// healDone reschedules key after an attempt: done (the target is in
// contact) rechecks it later; otherwise the backoff doubles up to its cap.
func (n *Node) healDone(key string, reached, done bool) {
	h := &n.heal
	h.mu.Lock()
	defer h.mu.Unlock()
	t := h.target(key)
	t.busy = false
	now := time.Now()
	if done {
		t.failures, t.backoff = 0, healMinBackoff
		t.next = now.Add(healSeedRecheck)
		return
	}
	if !reached {
		t.failures++
	}
	// Jitter (75-100%) keeps the nodes of a half from attempting in step.
	t.next = now.Add(t.backoff - time.Duration(rand.Int64N(int64(t.backoff/4)+1)))
	t.backoff = min(2*t.backoff, healMaxBackoff)
}

// reachMember joins the member name at its last known address. reached:
// the address answered; done: the member is alive for memberlist now.
func (n *Node) reachMember(name, addr string) (reached, done bool) {
	target := addr
	if !strings.Contains(name, "/") {
		target = name + "/" + addr // lets a node-aware transport use a connection it has
	}
	if err := n.join(target); err != nil {
		n.logFailure("member "+name, "cannot reach a member; retrying with backoff", "node", name, "addr", addr, "error", err)
		return false, false
	}
	if !n.liveNodes()[name] {
		return true, false
	}
	n.log.Info("rejoined a member", "node", name, "addr", addr, "members", n.numMembers())
	return true, true
}

// reachSeed resolves seed and joins its addresses unless one of them is
// a live member's or this node's.
func (n *Node) reachSeed(seed string) (reached, done bool) {
	// A seed may name its node ("name/host:port", memberlist's form for
	// node-aware transports): resolve the address, join with the name.
	prefix, hostPort := "", seed
	if i := strings.LastIndex(seed, "/"); i >= 0 {
		prefix, hostPort = seed[:i+1], seed[i+1:]
	}
	ctx, cancel := context.WithTimeout(n.ctx, healResolveTimeout)
	addrs, err := resolveSeed(ctx, hostPort, n.port)
	cancel()
	if err != nil {
		n.logFailure("seed "+seed, "cannot resolve a seed; retrying with backoff", "seed", seed, "error", err)
		return false, false
	}
	if n.inContact(addrs) {
		return true, true
	}
	var last error
	for _, a := range addrs {
		if err := n.join(prefix + a); err != nil {
			last = err
			continue
		}
		if n.inContact(addrs) {
			n.log.Info("joined through a seed", "seed", seed, "addr", a, "members", n.numMembers())
			return true, true
		}
		return true, false
	}
	n.logFailure("seed "+seed, "no seed reachable; retrying with backoff", "seed", seed, "addrs", addrs, "error", last)
	return false, false
}

// join runs one memberlist Join of addr ([name/]host:port).
func (n *Node) join(addr string) error {
	_, err := n.ml.Load().Join([]string{addr})
	return err
}

// inContact reports whether one of addrs is this node's or a live member's.
func (n *Node) inContact(addrs []string) bool {
	own := n.Addr()
	live := n.liveNodes()
	n.membersMu.Lock()
	defer n.membersMu.Unlock()
	for _, a := range addrs {
		if a == own {
			return true
		}
		for name, mi := range n.members {
			if live[name] && mi.addr == a {
				return true
			}
		}
	}
	return false
}

// logFailure logs a failed attempt: the first of a series at info (at warn
// when this node is alone), the later ones at debug.
func (n *Node) logFailure(key, msg string, args ...any) {
	if n.ctx.Err() != nil {
		return // closing: the attempt failed because memberlist stopped
	}
	n.heal.mu.Lock()
	first := n.heal.target(key).failures == 0
	n.heal.mu.Unlock()
	lvl := slog.LevelDebug
	if first {
		lvl = slog.LevelInfo
		if len(n.liveNodes()) == 0 {
			lvl = slog.LevelWarn
		}
	}
	n.log.Log(context.Background(), lvl, msg, args...)
}

// resolveSeed returns the host:port addresses seed ([host]:port, or a host
// alone for defaultPort) stands for now. Names are resolved at every call.
func resolveSeed(ctx context.Context, seed string, defaultPort int) ([]string, error) {
	host, port, err := net.SplitHostPort(seed)
	if err != nil {
		host, port = seed, strconv.Itoa(defaultPort)
	}
	if ip := net.ParseIP(host); ip != nil {
		return []string{net.JoinHostPort(ip.String(), port)}, nil
	}
	ips, err := net.DefaultResolver.LookupHost(ctx, host)
	if err != nil {
		return nil, err
	}
	out := make([]string, 0, len(ips))
	for _, ip := range ips {
		out = append(out, net.JoinHostPort(ip, port))
	}
	return out, nil
}

// rememberLocked records name's address as its last known one (called from
// memberlist's event callbacks: must not block). n.membersMu must be held.
func (n *Node) rememberLocked(name, addr string) {
	if name == n.cfg.Name || addr == "" || n.known[name] == addr {
		return
	}
	n.known[name] = addr
	n.knownDirty = true
}

// saveKnown stores the known members in the meta bucket if they changed.
func (n *Node) saveKnown() {
	n.membersMu.Lock()
	if !n.knownDirty {
		n.membersMu.Unlock()
		return
	}
	b, err := json.Marshal(n.known)
	n.knownDirty = false
	n.membersMu.Unlock()
	if err == nil {
		err = n.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bktMeta).Put(keyPeers, b) })
	}
	if err != nil {
		n.log.Warn("could not store the known members", "error", err)
		n.membersMu.Lock()
		n.knownDirty = true
		n.membersMu.Unlock()
	}
}

// loadKnown reads the known members stored by saveKnown. A missing or
// unreadable entry is an empty list (it only speeds up healing).
func loadKnown(db *bolt.DB) (map[string]string, error) {
	known := map[string]string{}
	err := db.View(func(tx *bolt.Tx) error {
		if v := tx.Bucket(bktMeta).Get(keyPeers); v != nil {
			return json.Unmarshal(v, &known)
		}
		return nil
	})
	if err != nil || known == nil { // known is nil after a stored "null"
		return map[string]string{}, err
	}
	return known, nil
}
