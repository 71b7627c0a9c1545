package relay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// The Manager is the path policy on top of a Mesh: it decides which
// mechanism (direct, punched, relayed) connects this node to each member
// of the circle, keeps those paths up and reports them.
//
// Every Interval the loop looks at the mesh's paths and, in goroutines of
// their own (at most one attempt per member at a time, each mechanism with
// its own backoff growing to maxBackoff):
//
//   - NAT detection: with a direct path to a relay X (a peer that sent a
//     TURN address in its hello), the public address of our primary socket
//     as X's STUN server sees it is compared with the address X's mesh sees
//     our connection come from ("observe" introduction). Same address: cone
//     (or none if it is our own address); different: symmetric. A relay
//     node (MeshConfig.TURN set) is reachable by definition: none. The
//     public address is re-checked every publicCheck and the kind
//     re-measured every remeasure and whenever a path to a relay drops; a
//     changed public address closes our punched paths (peers send to the
//     old mapping) and re-punches at once.
//   - Per member without a live path: direct (Connect to its advertised
//     address; a first try gets a head start of directHead, then the other
//     mechanisms run alongside); punched (PunchVia the nodes we reach
//     directly, relays first) unless either side is symmetric, once our own
//     kind is known; relayed when we are symmetric (or, as a fallback,
//     after punching failed repeatedly): our allocation on a relay X and
//     the "relay" introduction, which has the member dial our relayed
//     address from its primary socket. A member reached only through a
//     relay is tried direct and, when neither side is symmetric, punched
//     again (with backoff), so the pair upgrades. Relays we have been
//     connected to are dialed (direct only) for rememberRelays after they
//     left the members: a relay that comes back cannot dial nodes behind
//     NAT, and the membership layer may have given up on it. So direct
//     attempts to a relay we knew back off to relayRedial at most. An
//     introduction refused at once for want of a path is retried after
//     cheapRetry, without growing the backoff.
//   - Allocations: a node that needs them holds one on each of (up to
//     maxAllocations) relays it reaches directly, so failover is
//     immediate. An allocation is released when the path to its relay
//     drops or the relay was restarted (a path to it with a new
//     incarnation in its hello: the allocation died with the old process,
//     even if the old path has not timed out yet), when the relay's STUN
//     server stops answering (a killed relay is noticed in seconds, not
//     after the mesh's idle timeout; only if another relay is usable) or
//     when permissions on it keep failing; one whose credentials are 3/4
//     through CredentialTTL, or made before our public address changed,
//     is replaced (new allocation, peers moved over, then the old
//     released).
//
// Known limits: an allocation that pion fails to refresh is only noticed
// through failing permissions, a lost relay or renewal; Close may wait for
// a TURN permission request in flight (pion retransmits it for about 8 s
// when the server does not answer).

// Member is one member of the circle as the membership layer (memberlist,
// through the replicator) knows it.
type Member struct {
	Name string // node name, as in its mesh certificate
	Addr string // advertised mesh address host:port (may be a LAN address behind NAT)
}

// ManagerConfig configures a Manager. Zero values of optional fields mean
// the default stated on the field.
type ManagerConfig struct {
	// Mesh is the node's mesh (required). The Manager adds and removes
	// TURN relay sockets on it (AddRelay/RemoveRelay) and opens
	// connections; it does not close it.
	Mesh *Mesh

	// Secret is the circle secret (required): TURN credentials derive
	// from it.
	Secret []byte

	// Members returns the other alive members of the circle (never this
	// node). Required. Called from the policy loop; must not block for
	// long.
	Members func() []Member

	// Interval is the period of the policy loop. Default 1s.
	Interval time.Duration

	// CredentialTTL is the lifetime of the TURN credentials of each
	// allocation; allocations are replaced before it runs out.
	// Default DefaultCredentialTTL.
	CredentialTTL time.Duration

	// Logger receives the manager's logs. Default: discard.
	Logger *slog.Logger

	// ListenPacket opens the local UDP socket of a TURN allocation.
	// Default: a UDP socket on the mesh socket's IP, any port.
	ListenPacket func() (net.PacketConn, error)
}

// NATKind is what the Manager found out about this node's NAT.
type NATKind string

// NAT kinds.
const (
	NATUnknown   NATKind = "unknown"   // not measured yet (no relay known)
	NATNone      NATKind = "none"      // reachable: the public address is the node's own
	NATCone      NATKind = "cone"      // one public port for every destination: punchable
	NATSymmetric NATKind = "symmetric" // a public port per destination: needs a TURN relay
)

// AllocationStatus describes one TURN allocation this node holds.
type AllocationStatus struct {
	Relay     string    // node name of the relay
	Server    string    // its TURN address
	RelayAddr string    // the relayed address peers reach us at
	Since     time.Time // when it was allocated
	Expires   time.Time // when its credentials run out (it is replaced before)
}

// PeerStatus is the Manager's view of one member.
type PeerStatus struct {
	Name string
	// Path is the best live path (zero Kind if none); Paths all of them.
	Path  PathInfo
	Paths []PathInfo
	// Connected reports whether any live path exists.
	Connected bool
	// LastError is the last failed attempt to connect, if not connected.
	LastError string
}

// ManagerStatus is a snapshot for status pages.
type ManagerStatus struct {
	NAT         NATKind
	Public      string            // this node's public (server-reflexive) address, if known
	Relays      map[string]string // known relays: node name -> TURN address
	Allocations []AllocationStatus
	Peers       []PeerStatus // every member, by name
}

// Timings of the policy.
const (
	maxBackoff      = 30 * time.Second // cap of every per-peer backoff
	firstBackoff    = time.Second
	publicCheck     = 5 * time.Second        // re-check of our public address
	remeasure       = 30 * time.Second       // full NAT re-measurement
	directTimeout   = 3 * time.Second        // bound on one direct attempt
	directHead      = 500 * time.Millisecond // head start of a first direct attempt
	replanEvery     = 250 * time.Millisecond // while it runs on, how often the rest is reconsidered
	relayRedial     = 4 * time.Second        // cap of the direct backoff towards a relay we knew (it cannot dial nodes behind NAT)
	cheapRetry      = 2 * time.Second        // retry of an introduction refused for want of a path
	punchFallback   = 2                      // failed punches before relaying anyway
	punchGrace      = 3 * time.Second        // the larger name waits this long before punching too
	maxAllocations  = 2
	maxIntroducers  = 2                // tried per punch attempt
	suspectFor      = 30 * time.Second // a relay that did not answer STUN is not used for this long
	stunTimeout     = 3 * time.Second  // bound on one STUN check (6 requests)
	observeRetries  = 10               // observe until it agrees with STUN (the relay may not have migrated our path yet)
	observeInterval = 300 * time.Millisecond
)

// Manager runs the path policy of one node. Every method is safe for
// concurrent use.
type Manager struct {
	cfg    ManagerConfig
	mesh   *Mesh
	log    *slog.Logger
	listen func() (net.PacketConn, error)
	relay  bool // this node runs a TURN server itself

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	wake   chan struct{}
	once   sync.Once

	mu         sync.Mutex // guards the following
	nat        NATKind
	public     netip.AddrPort
	publicAt   string // the STUN server public was measured with
	natBusy    bool
	measuredAt time.Time                // last full measurement (or failed attempt)
	checkedAt  time.Time                // last public address check
	measureNow bool                     // re-measure at the next tick
	relays     map[string]string        // relays we have a direct path to: name -> TURN address
	relayInc   map[string]uint64        // their incarnations (newest path's hello)
	suspect    map[string]time.Time     // relays whose STUN server did not answer, since
	known      map[string]knownRelay    // relays we have been connected to, by name
	allocs     map[string]*managedAlloc // by relay name
	allocBusy  map[string]bool
	allocNext  map[string]*backoff
	peers      map[string]*peerState
	gen        int
	closed     bool
}

// managedAlloc is an allocation the Manager holds, added to the mesh as a
// relay socket under key.
type managedAlloc struct {
	relay, server, key string
	a                  *Allocation
	inc                uint64 // the relay's incarnation when allocated (0: unknown)
	since, expires     time.Time
	renew              bool         // replace it now (guarded by Manager.mu)
	permFails          atomic.Int32 // consecutive failed permissions
}

// brokenAfter failed permissions in a row mark an allocation broken (the
// server lost it, or refuses our credentials): it is released and made
// again.
const brokenAfter = 3

// unusedGrace is how long an allocation a non-symmetric node made as a
// fallback is kept without relayed paths over it.
const unusedGrace = 30 * time.Second

// peerState is the policy's state for one member.
type peerState struct {
	busy                 bool
	upgrade              bool               // the attempt in flight is for a member reached through a relay
	cancel               context.CancelFunc // of the attempt in flight
	direct, punch, relay backoff
	punchFails           int
	needSince            time.Time // since when the member lacks a non-relayed path
	lastErr              string
}

// backoff spaces attempts of one kind: due once next has passed.
type backoff struct {
	next time.Time
	d    time.Duration
}

func (b *backoff) due(now time.Time) bool { return !now.Before(b.next) }

func (b *backoff) fail(now time.Time) {
	switch {
	case b.d == 0:
		b.d = firstBackoff
	case b.d < maxBackoff:
		b.d *= 2
	}
	b.d = min(b.d, maxBackoff)
	b.next = now.Add(b.d)
}

func (b *backoff) reset() { *b = backoff{} }

// soon schedules a cheap retry (the attempt was refused at once, e.g. by
// an introducer still waiting for a path) without growing the backoff.
func (b *backoff) soon(now time.Time) { b.next = now.Add(cheapRetry) }

// NewManager starts the policy loop for cfg.Mesh.
func NewManager(cfg ManagerConfig) (*Manager, error) {
	if cfg.Mesh == nil || cfg.Members == nil {
		return nil, errors.New("relay: ManagerConfig needs Mesh and Members")
	}
	if len(cfg.Secret) < 16 {
		return nil, ErrInvalid
	}
	if cfg.Interval <= 0 {
		cfg.Interval = time.Second
	}
	if cfg.CredentialTTL <= 0 {
		cfg.CredentialTTL = DefaultCredentialTTL
	}
	ctx, cancel := context.WithCancel(context.Background())
	m := &Manager{
		cfg: cfg, mesh: cfg.Mesh, log: orDiscard(cfg.Logger).With("node", cfg.Mesh.Name()),
		listen: cfg.ListenPacket, relay: cfg.Mesh.cfg.TURN != "",
		ctx: ctx, cancel: cancel, wake: make(chan struct{}, 1),
		nat: NATUnknown, relays: map[string]string{}, known: map[string]knownRelay{}, relayInc: map[string]uint64{}, suspect: map[string]time.Time{}, allocs: map[string]*managedAlloc{},
		allocBusy: map[string]bool{}, allocNext: map[string]*backoff{}, peers: map[string]*peerState{},
	}
	if m.listen == nil {
		host := "0.0.0.0"
		if ua, ok := cfg.Mesh.primary.conn.LocalAddr().(*net.UDPAddr); ok && cfg.Mesh.primary.via == "" && ua.IP != nil && !ua.IP.IsUnspecified() {
			host = ua.IP.String()
		}
		m.listen = func() (net.PacketConn, error) { return net.ListenPacket("udp", net.JoinHostPort(host, "0")) }
	}
	if m.relay {
		m.nat = NATNone
		if ap, err := netip.ParseAddrPort(cfg.Mesh.advertise.String()); err == nil {
			m.public = ap
		}
		cfg.Mesh.setNAT(NATNone)
	}
	m.wg.Add(1)
	go m.run()
	return m, nil
}

func (m *Manager) run() {
	defer m.wg.Done()
	t := time.NewTicker(m.cfg.Interval)
	defer t.Stop()
	for {
		m.tick()
		select {
		case <-m.ctx.Done():
			return
		case <-t.C:
		case <-m.wake:
		}
	}
}

// poke runs the loop again soon.
func (m *Manager) poke() {
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

// spawn runs f in a goroutine Close waits for, unless closed.
func (m *Manager) spawn(f func()) bool {
	if m.ctx.Err() != nil {
		return false
	}
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		f()
	}()
	return true
}

func (m *Manager) members() []Member {
	var out []Member
	self := m.mesh.Name()
	for _, mem := range m.cfg.Members() {
		if mem.Name != "" && mem.Name != self {
			out = append(out, mem)
		}
	}
	return out
}

// tick is one round of the policy.
func (m *Manager) tick() {
	if m.ctx.Err() != nil {
		return
	}
	now := time.Now()
	paths := m.mesh.Paths()
	byPeer := map[string][]PathInfo{}
	relays := map[string]string{}
	incs := map[string]uint64{}
	for _, p := range paths { // oldest first per peer
		byPeer[p.Peer] = append(byPeer[p.Peer], p)
		if p.TURN != "" && p.Kind == PathDirect {
			relays[p.Peer] = p.TURN
			if p.Inc != 0 {
				incs[p.Peer] = p.Inc
			}
		}
	}
	members := m.members()

	m.mu.Lock()
	defer m.mu.Unlock()
	// A relay whose incarnation changed was restarted: our allocations on
	// it died with its old process, even though a path to it never went
	// away (a new connection, e.g. memberlist's, may come up before the
	// old one times out).
	for name, inc := range incs {
		if old := m.relayInc[name]; old != 0 && old != inc {
			m.log.Info("manager: relay restarted", "relay", name)
			m.measureNow = true
			for _, ps := range m.peers {
				ps.punch.reset()
				ps.relay.reset()
			}
			if bo := m.allocNext[name]; bo != nil {
				bo.reset()
			}
		}
		m.relayInc[name] = inc
	}
	for name := range m.relayInc {
		if _, ok := relays[name]; !ok {
			delete(m.relayInc, name) // (a new path's hello tells the new one)
		}
	}
	for name := range m.relays {
		if _, ok := relays[name]; !ok {
			m.log.Debug("manager: lost the path to a relay", "relay", name)
			m.measureNow = true
		}
	}
	for name := range relays {
		if _, ok := m.relays[name]; !ok {
			m.measureNow = true // tell it our NAT kind
			// A new (or returning) relay: introductions through it may
			// work now.
			for _, ps := range m.peers {
				ps.punch.reset()
				ps.relay.reset()
			}
		}
	}
	m.relays = relays
	// Relays whose STUN server stopped answering are not used (for a
	// while) even though their path has not timed out yet: a relay that
	// was killed takes IdleTimeout to be noticed otherwise.
	usable := maps.Clone(relays)
	for name, since := range m.suspect {
		if _, ok := relays[name]; !ok || now.Sub(since) >= suspectFor {
			delete(m.suspect, name)
			continue
		}
		delete(usable, name)
	}
	if len(usable) > 0 {
		relays = usable // (with no other relay, keep using it: it may be slow only)
	}

	// NAT detection.
	if !m.relay && !m.natBusy && len(relays) > 0 {
		full := m.measureNow || m.nat == NATUnknown && now.Sub(m.measuredAt) >= m.cfg.Interval ||
			now.Sub(m.measuredAt) >= remeasure
		if full || now.Sub(m.checkedAt) >= publicCheck {
			m.natBusy = true
			m.measureNow = false
			relaysCopy := maps.Clone(relays)
			if !m.spawn(func() { m.measure(relaysCopy, full) }) {
				m.natBusy = false
			}
		}
	}

	// Allocations.
	wantAllocs := m.nat == NATSymmetric
	for name, ps := range m.peers {
		if ps.punchFails >= punchFallback && !ps.needSince.IsZero() && m.mesh.natOf(name) != NATSymmetric {
			wantAllocs = true // relaying as a fallback
		}
	}
	for name, ma := range m.allocs {
		if m.allocBusy[name] {
			continue
		}
		var why string
		switch _, ok := relays[name]; {
		case !ok:
			why = "lost the relay"
		case ma.inc != 0 && m.relayInc[name] != 0 && ma.inc != m.relayInc[name]:
			why = "relay restarted"
		case ma.permFails.Load() >= brokenAfter:
			why = "permissions fail"
		case !wantAllocs && now.Sub(ma.since) > unusedGrace && len(m.mesh.relayPeers(ma.key)) == 0:
			why = "not needed"
		}
		if why != "" {
			m.log.Info("manager: releasing an allocation", "relay", name, "why", why)
			delete(m.allocs, name)
			m.spawn(func() {
				m.release(ma)
				m.poke()
			})
			continue
		}
		renewAt := ma.since.Add(ma.expires.Sub(ma.since) * 3 / 4)
		if bo := m.allocNext[name]; bo != nil && !bo.due(now) {
			continue
		}
		if ma.renew || !now.Before(renewAt) {
			m.allocBusy[name] = true
			inc := m.relayInc[name]
			if !m.spawn(func() { m.allocate(name, ma.server, inc, ma) }) {
				m.allocBusy[name] = false
			}
		}
	}
	if wantAllocs {
		n := len(m.allocs)
		for _, name := range slices.Sorted(maps.Keys(relays)) {
			if n >= maxAllocations {
				break
			}
			if m.allocs[name] != nil {
				continue
			}
			if m.allocBusy[name] {
				n++
				continue
			}
			bo := m.allocNext[name]
			if bo == nil {
				bo = &backoff{}
				m.allocNext[name] = bo
			}
			if !bo.due(now) {
				continue
			}
			n++
			m.allocBusy[name] = true
			server := relays[name]
			inc := m.relayInc[name]
			if !m.spawn(func() { m.allocate(name, server, inc, nil) }) {
				m.allocBusy[name] = false
			}
		}
	}

	// Relays stay worth a direct attempt after they left the members
	// (dead to memberlist): nodes behind NAT cannot be dialed, so when a
	// relay comes back it is up to them to reconnect, and memberlist stops
	// gossiping to dead nodes after a while.
	extra := map[string]bool{}
	isMember := map[string]bool{}
	for _, mem := range members {
		isMember[mem.Name] = true
		if _, ok := m.relays[mem.Name]; ok {
			m.known[mem.Name] = knownRelay{addr: mem.Addr, seen: now}
		}
	}
	for name, kr := range m.known {
		_, connected := m.relays[name]
		switch {
		case isMember[name]:
		case connected:
			kr.seen = now
			m.known[name] = kr
		case now.Sub(kr.seen) > rememberRelays:
			delete(m.known, name)
		default:
			members = append(members, Member{Name: name, Addr: kr.addr})
			extra[name] = true
		}
	}

	// Members.
	seen := map[string]bool{}
	for _, mem := range members {
		seen[mem.Name] = true
		ps := m.peers[mem.Name]
		if ps == nil {
			ps = &peerState{}
			m.peers[mem.Name] = ps
		}
		live := byPeer[mem.Name]
		relayedOnly := len(live) > 0
		nonRelayed := false
		for _, p := range live {
			if p.Kind != PathRelayed {
				nonRelayed = true
			}
		}
		if nonRelayed {
			if !ps.busy {
				ps.direct.reset()
				ps.punch.reset()
				ps.relay.reset()
				ps.punchFails = 0
			}
			ps.needSince = time.Time{}
			ps.lastErr = ""
			continue
		}
		if relayedOnly {
			ps.lastErr = ""
		}
		if ps.needSince.IsZero() {
			ps.needSince = now
		}
		if ps.busy {
			if ps.upgrade && !relayedOnly {
				// The relayed path died under an upgrade attempt: start
				// over, relaying first.
				ps.cancel()
			}
			continue
		}
		pl := m.planLocked(mem.Name, ps, paths, now)
		if extra[mem.Name] {
			pl = plan{directOnly: true} // a relay we knew
		}
		pl.direct = ps.direct.due(now)
		// A direct attempt that failed before goes last, so that it does
		// not hold up the mechanisms that work (it takes directTimeout
		// to fail).
		pl.directLast = ps.direct.d > 0
		if !pl.direct && !pl.punch && !pl.relay {
			continue
		}
		ctx, cancel := context.WithCancel(m.ctx)
		ps.busy, ps.upgrade, ps.cancel = true, relayedOnly, cancel
		mem := mem
		if !m.spawn(func() { m.attempt(ctx, mem, ps, pl) }) {
			ps.busy = false
			cancel()
		}
	}
	for name, ps := range m.peers {
		if !seen[name] && !ps.busy {
			delete(m.peers, name)
		}
	}
}

// knownRelay is a relay this node was connected to: its advertised
// address, and when it was last a member or connected.
type knownRelay struct {
	addr string
	seen time.Time
}

// rememberRelays is how long a relay that left the members is still
// dialed (with backoff).
const rememberRelays = 24 * time.Hour

// plan is what an attempt tries for one member.
type plan struct {
	directOnly         bool // (a relay that is no longer a member)
	direct, directLast bool
	punch, relay       bool
	introducers        []string        // for punching
	allocs             []*managedAlloc // for relaying
}

// planLocked decides whether to punch or relay to peer now (direct is the
// caller's business), from the mesh's paths (with no non-relayed path to
// peer). Called with m.mu held.
func (m *Manager) planLocked(peer string, ps *peerState, paths []PathInfo, now time.Time) plan {
	var pl plan
	relayedOnly := false
	direct := map[string]bool{}
	relays := map[string]bool{} // that we may use
	for _, p := range paths {
		if p.Peer == peer {
			relayedOnly = true
		}
		if p.Kind == PathDirect && p.Peer != peer {
			direct[p.Peer] = true
		}
		if _, bad := m.suspect[p.Peer]; p.Kind == PathDirect && p.TURN != "" && !bad {
			relays[p.Peer] = true
		}
	}
	// Introducers: nodes we reach over a direct path, relays first (they
	// are the ones everybody reaches).
	intro := slices.Collect(maps.Keys(direct))
	slices.SortFunc(intro, func(x, y string) int {
		rx, ry := relays[x], relays[y]
		if rx != ry {
			if rx {
				return -1
			}
			return 1
		}
		return strings.Compare(x, y)
	})
	if len(intro) > maxIntroducers {
		intro = intro[:maxIntroducers]
	}
	pl.introducers = intro
	for _, name := range slices.Sorted(maps.Keys(m.allocs)) {
		if name != peer {
			pl.allocs = append(pl.allocs, m.allocs[name])
		}
	}
	theirs := m.mesh.natOf(peer)
	// Our own kind first, if a relay can tell us.
	known := m.nat != NATUnknown || len(relays) == 0
	canPunch := known && m.nat != NATSymmetric && theirs != NATSymmetric
	pl.punch = canPunch && len(pl.introducers) > 0 && ps.punch.due(now) &&
		(m.mesh.Name() < peer || now.Sub(ps.needSince) >= punchGrace)
	holder := !relayedOnly && (m.nat == NATSymmetric || theirs != NATSymmetric && ps.punchFails >= punchFallback)
	pl.relay = holder && len(pl.allocs) > 0 && ps.relay.due(now)
	return pl
}

// attempt tries to connect to mem, as the flags say: direct (last if it
// failed before), relayed (only when this node is the one to relay),
// punched; each failure backs off that mechanism. Relaying goes before
// punching: when both are on, punching failed before, and the pair keeps
// punching (to upgrade) once it has a relayed path.
func (m *Manager) attempt(ctx context.Context, mem Member, ps *peerState, pl plan) {
	var errs []error
	defer func() {
		m.mu.Lock()
		ps.cancel()
		ps.busy = false
		if len(errs) > 0 {
			ps.lastErr = errors.Join(errs...).Error()
		}
		m.mu.Unlock()
		m.poke() // the next attempt (if one is due) need not wait for the tick
	}()
	hs := m.mesh.cfg.HandshakeTimeout
	ok := func(what string) {
		m.log.Debug("manager: connected", "peer", mem.Name, "how", what)
		errs = nil
	}
	// direct tries mem's advertised address (safe to run concurrently
	// with the rest: it touches only ps.direct, under m.mu).
	direct := func() error {
		err := func() error {
			addr, err := net.ResolveUDPAddr("udp", mem.Addr)
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(ctx, min(hs, directTimeout))
			defer cancel()
			return m.mesh.Connect(ctx, mem.Name, addr)
		}()
		m.mu.Lock()
		if err == nil {
			ps.direct.reset()
		} else {
			now := time.Now()
			ps.direct.fail(now)
			if _, ok := m.known[mem.Name]; ok && ps.direct.d > relayRedial {
				// A relay we knew: it cannot dial us when it returns.
				ps.direct.d, ps.direct.next = relayRedial, now.Add(relayRedial)
			}
		}
		m.mu.Unlock()
		if err == nil {
			m.log.Debug("manager: connected", "peer", mem.Name, "how", "direct")
			return nil
		}
		return fmt.Errorf("direct: %w", err)
	}
	if pl.direct && !pl.directLast {
		// Direct first, but a peer that does not answer within
		// directHead (it takes directTimeout to give up on it) does not
		// hold up the other mechanisms: they run alongside, as soon as
		// they can (a first path to a relay, our NAT kind or an
		// allocation may arrive meanwhile).
		done := make(chan error, 1)
		go func() { done <- direct() }()
		wait := time.NewTimer(directHead)
		defer wait.Stop()
		pending := true
		for {
			select {
			case err := <-done:
				pending = false
				if err == nil {
					errs = nil
					return
				}
				errs = append(errs, err)
			case <-wait.C:
				wait.Reset(replanEvery)
			case <-ctx.Done():
				<-done
				return
			}
			paths := m.mesh.Paths()
			for _, p := range paths {
				if p.Peer == mem.Name && p.Kind != PathRelayed {
					if pending {
						<-done
					}
					return // (the peer got through to us meanwhile)
				}
			}
			var fresh plan
			if !pl.directOnly {
				m.mu.Lock()
				fresh = m.planLocked(mem.Name, ps, paths, time.Now())
				m.mu.Unlock()
			}
			if fresh.punch || fresh.relay || !pending {
				pl.punch, pl.relay, pl.introducers, pl.allocs = fresh.punch, fresh.relay, fresh.introducers, fresh.allocs
				break
			}
		}
		if pending {
			defer func() {
				if err := <-done; err != nil {
					errs = append(errs, err)
				}
			}()
		}
	}
	if ctx.Err() != nil {
		return
	}
	if pl.relay {
		err := errors.New("no allocation on another relay")
		for _, ma := range pl.allocs {
			if err = m.relayTo(ctx, ma, mem.Name); err == nil || ctx.Err() != nil {
				break
			}
		}
		m.mu.Lock()
		switch {
		case err == nil:
			ps.relay.reset()
		case errors.Is(err, errIntroducerNoPath):
			ps.relay.soon(time.Now())
		default:
			ps.relay.fail(time.Now())
		}
		m.mu.Unlock()
		if err == nil {
			ok("relayed")
			return
		}
		errs = append(errs, fmt.Errorf("relay: %w", err))
	}
	if ctx.Err() != nil {
		return
	}
	if pl.punch {
		var err error
		refused := true // by every introducer, for want of a path
		for _, in := range pl.introducers {
			pctx, cancel := context.WithTimeout(ctx, 2*hs)
			err = m.mesh.PunchVia(pctx, mem.Name, in)
			cancel()
			if !errors.Is(err, errIntroducerNoPath) {
				refused = false
			}
			if err == nil || ctx.Err() != nil {
				break
			}
		}
		m.mu.Lock()
		switch {
		case err == nil:
			ps.punch.reset()
			ps.punchFails = 0
		case refused:
			ps.punch.soon(time.Now())
		case m.mesh.natOf(mem.Name) == NATSymmetric:
			ps.punch.fail(time.Now()) // (learnt just now: no more punching)
		default:
			ps.punch.fail(time.Now())
			ps.punchFails++
		}
		m.mu.Unlock()
		if err == nil {
			ok("punched")
			return
		}
		errs = append(errs, fmt.Errorf("punch: %w", err))
	}
	if pl.direct && pl.directLast && ctx.Err() == nil {
		if err := direct(); err != nil {
			errs = append(errs, err)
		}
	}
}

// relayTo has peer dial our relayed address on ma and waits for the
// connection to show up on ma's socket.
func (m *Manager) relayTo(ctx context.Context, ma *managedAlloc, peer string) error {
	hs := m.mesh.cfg.HandshakeTimeout
	ctx, cancel := context.WithTimeout(ctx, 2*hs)
	defer cancel()
	err := m.mesh.requestRelay(ctx, ma.relay, peer, ma.a.RelayAddr(), func(addr net.Addr) error {
		if err := ma.a.CreatePermission(addr); err != nil {
			ma.permFails.Add(1)
			return err
		}
		ma.permFails.Store(0)
		return nil
	})
	if err != nil {
		return err
	}
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for !m.mesh.relayPeers(ma.key)[peer] {
		select {
		case <-ctx.Done():
			return fmt.Errorf("relay: %s did not connect through %s", peer, ma.relay)
		case <-t.C:
		}
	}
	return nil
}

// allocate creates an allocation on relay name (TURN server at server)
// and adds it to the mesh; if old is not nil it replaces old: the peers
// connected over old are moved to the new allocation, then old is
// released. inc is the relay's incarnation when the allocation was
// decided (0 if unknown).
func (m *Manager) allocate(name, server string, inc uint64, old *managedAlloc) {
	ma, err := m.newAlloc(name, server)
	if ma != nil {
		ma.inc = inc
	}
	m.mu.Lock()
	m.allocBusy[name] = false
	bo := m.allocNext[name]
	if bo == nil {
		bo = &backoff{}
		m.allocNext[name] = bo
	}
	if err != nil {
		bo.fail(time.Now())
		m.mu.Unlock()
		m.log.Warn("manager: allocation failed", "relay", name, "server", server, "err", err)
		return
	}
	bo.reset()
	if m.closed || m.ctx.Err() != nil || old != nil && m.allocs[name] != old {
		m.mu.Unlock()
		m.release(ma)
		return
	}
	if old != nil {
		// Keep renewing from being retried while peers move.
		m.allocBusy[name] = true
	}
	m.allocs[name] = ma
	m.mu.Unlock()
	m.log.Info("manager: allocated", "relay", name, "relayed", ma.a.RelayAddr().String(), "renewal", old != nil)
	if old == nil {
		m.poke()
		return
	}
	for peer := range m.mesh.relayPeers(old.key) {
		if err := m.relayTo(m.ctx, ma, peer); err != nil {
			m.log.Warn("manager: moving a peer to the renewed allocation", "peer", peer, "relay", name, "err", err)
		}
	}
	m.release(old)
	m.mu.Lock()
	m.allocBusy[name] = false
	m.mu.Unlock()
}

func (m *Manager) newAlloc(name, server string) (*managedAlloc, error) {
	conn, err := m.listen()
	if err != nil {
		return nil, err
	}
	// Close ends a pending allocation at once (pion retransmits for
	// about 8 s to a server that does not answer).
	stop := context.AfterFunc(m.ctx, func() { conn.Close() })
	defer stop()
	now := time.Now()
	a, err := Allocate(AllocateConfig{
		Conn: conn, Server: server, Secret: m.cfg.Secret, Node: m.mesh.Name(),
		TTL: m.cfg.CredentialTTL, Logger: m.cfg.Logger,
	})
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	m.gen++
	key := fmt.Sprintf("%s#%d", name, m.gen)
	m.mu.Unlock()
	if err := m.mesh.addRelay(key, name, a.PacketConn()); err != nil {
		a.Close()
		return nil, err
	}
	return &managedAlloc{relay: name, server: server, key: key, a: a, since: now, expires: now.Add(m.cfg.CredentialTTL)}, nil
}

// release stops using an allocation and frees it.
func (m *Manager) release(ma *managedAlloc) {
	m.mesh.removeRelay(ma.key)
	ma.a.Close()
}

// measure finds our public address (STUN at a relay's TURN server) and,
// if full or it changed, our NAT kind (comparing it with the address the
// relay's mesh sees).
func (m *Manager) measure(relays map[string]string, full bool) {
	defer func() {
		m.mu.Lock()
		m.natBusy = false
		m.mu.Unlock()
	}()
	names := slices.Sorted(maps.Keys(relays))
	if len(names) == 0 {
		return
	}
	via := names[0]
	ctx, cancel := context.WithTimeout(m.ctx, 2*ReflexiveTimeout)
	defer cancel()
	sctx, scancel := context.WithTimeout(ctx, stunTimeout)
	pub, err := m.mesh.Reflexive(sctx, relays[via])
	scancel()
	now := time.Now()
	if err != nil {
		if m.ctx.Err() != nil {
			return
		}
		m.mu.Lock()
		m.suspect[via] = now
		if len(relays) == 1 {
			m.checkedAt = now
			if full {
				m.measuredAt = now
			}
		}
		m.mu.Unlock()
		m.log.Info("manager: relay does not answer stun", "relay", via, "err", err)
		m.poke()
		return
	}
	m.mu.Lock()
	prev, prevAt := m.public, m.publicAt
	m.checkedAt = now
	_, wasSuspect := m.suspect[via]
	m.mu.Unlock()
	if wasSuspect {
		// Its STUN server answers again: if our path to it does not, the
		// relay was restarted (its new process does not know our
		// connection, which would take IdleTimeout to time out, and a
		// relay cannot dial us behind NAT). Drop it and redial.
		octx, ocancel := context.WithTimeout(ctx, stunTimeout)
		_, _, oerr := m.mesh.observe(octx, via)
		ocancel()
		if oerr != nil && m.ctx.Err() == nil {
			n := m.mesh.closeDirectTo(via)
			m.log.Info("manager: relay answers stun again, but not over our path: reconnecting", "relay", via, "closed", n, "err", oerr)
			m.poke()
			return
		}
	}
	// Behind a symmetric NAT every server sees another port: compare
	// measurements with the same server only.
	sameServer := prevAt == relays[via]
	changed := prev.IsValid() && sameServer && prev != pub
	if !full && !changed && sameServer {
		return
	}
	if changed {
		n := m.mesh.closePunched()
		m.log.Info("manager: public address changed", "old", prev.String(), "new", pub.String(), "punched_closed", n)
	}
	kind := NATUnknown
	if own(m.mesh, pub) {
		kind = NATNone
	} else {
		tries := 2
		if changed {
			tries = observeRetries
		}
		for i := 0; i < tries; i++ {
			octx, ocancel := context.WithTimeout(ctx, stunTimeout)
			obs, _, err := m.mesh.observe(octx, via)
			ocancel()
			if err != nil {
				// No verdict without an observation: keep the kind.
				m.log.Debug("manager: observe failed", "relay", via, "err", err)
				break
			}
			if obs == pub {
				kind = NATCone
				break
			}
			kind = NATSymmetric
			select {
			case <-ctx.Done():
				return
			case <-time.After(observeInterval):
			}
		}
	}
	if kind == NATUnknown {
		m.mu.Lock()
		kind = m.nat
		m.mu.Unlock()
	}
	m.mesh.setNAT(kind)
	// Tell the other relays our kind (and learn theirs).
	for _, r := range names[1:] {
		octx, ocancel := context.WithTimeout(ctx, stunTimeout)
		m.mesh.observe(octx, r)
		ocancel()
	}
	m.mu.Lock()
	if kind != m.nat {
		m.log.Info("manager: NAT", "kind", kind, "public", pub.String())
	}
	m.nat, m.public, m.publicAt = kind, pub, relays[via]
	m.measuredAt = time.Now()
	if changed {
		for _, ps := range m.peers {
			ps.direct.reset()
			ps.punch.reset()
			ps.relay.reset()
			ps.needSince = time.Time{}
		}
		// The mappings of our allocations' sockets have probably changed
		// too, which loses the allocations (TURN knows them by the
		// client's address): replace them.
		for _, ma := range m.allocs {
			ma.renew = true
		}
	}
	m.mu.Unlock()
	m.poke()
}

// own reports whether ap is the mesh's own (local or advertised) address.
func own(mesh *Mesh, ap netip.AddrPort) bool {
	for _, a := range []net.Addr{mesh.primary.conn.LocalAddr(), mesh.advertise} {
		if x, err := netip.ParseAddrPort(a.String()); err == nil && netip.AddrPortFrom(x.Addr().Unmap(), x.Port()) == ap {
			return true
		}
	}
	return false
}

// Status reports the NAT, allocations and the path to every member.
func (m *Manager) Status() ManagerStatus {
	paths := m.mesh.Paths()
	members := m.members()
	m.mu.Lock()
	defer m.mu.Unlock()
	st := ManagerStatus{NAT: m.nat, Relays: maps.Clone(m.relays)}
	if m.public.IsValid() {
		st.Public = m.public.String()
	}
	for _, name := range slices.Sorted(maps.Keys(m.allocs)) {
		ma := m.allocs[name]
		st.Allocations = append(st.Allocations, AllocationStatus{
			Relay: ma.relay, Server: ma.server, RelayAddr: ma.a.RelayAddr().String(),
			Since: ma.since, Expires: ma.expires,
		})
	}
	slices.SortFunc(members, func(a, b Member) int { return strings.Compare(a.Name, b.Name) })
	for _, mem := range members {
		ps := PeerStatus{Name: mem.Name}
		for _, p := range paths {
			if p.Peer == mem.Name {
				ps.Paths = append(ps.Paths, p)
			}
		}
		if best := bestPath(ps.Paths); best != nil {
			ps.Path, ps.Connected = *best, true
		} else if st := m.peers[mem.Name]; st != nil {
			ps.LastError = st.lastErr
		}
		st.Peers = append(st.Peers, ps)
	}
	return st
}

// bestPath is the path the mesh sends on: direct before punched before
// relayed, newest first.
func bestPath(ps []PathInfo) *PathInfo {
	rank := map[PathKind]int{PathDirect: 0, PathPunched: 1, PathRelayed: 2}
	var best *PathInfo
	for i := range ps {
		p := &ps[i]
		if best == nil || rank[p.Kind] < rank[best.Kind] || rank[p.Kind] == rank[best.Kind] && !p.Since.Before(best.Since) {
			best = p
		}
	}
	return best
}

// PeerIPs returns the public IPs of the peers this node has direct or
// punched (not relayed) connections with, as this node sees them: the
// only addresses this node's TURN server may relay to
// (ServerConfig.Peers). Fast and non-blocking: it reads the mesh's
// connection table, no network.
func (m *Manager) PeerIPs() []netip.Addr {
	return m.mesh.directIPs()
}

// Close stops the policy loop and releases the allocations. The mesh
// stays up. It is idempotent.
func (m *Manager) Close() error {
	m.once.Do(func() {
		m.cancel()
		m.wg.Wait()
		m.mu.Lock()
		m.closed = true
		allocs := m.allocs
		m.allocs = map[string]*managedAlloc{}
		m.mu.Unlock()
		for _, ma := range allocs {
			m.release(ma)
		}
	})
	return nil
}
