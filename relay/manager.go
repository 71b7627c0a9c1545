package relay

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"
)

// The Manager is the path policy on top of a Mesh: it decides which
// mechanism (direct, punched, relayed) connects this node to each member
// of the circle, keeps those paths up and reports them.
//
// NOTE: this file was committed as the API contract first; the policy
// loop is being filled in (issue 4). Until then NewManager only records
// its configuration and Status reports the mesh's paths.

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

// Manager runs the path policy of one node. Every method is safe for
// concurrent use.
type Manager struct {
	cfg ManagerConfig
	log *slog.Logger

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

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
	return &Manager{cfg: cfg, log: orDiscard(cfg.Logger), ctx: ctx, cancel: cancel}, nil
}

// Status reports the NAT, allocations and the path to every member.
func (m *Manager) Status() ManagerStatus {
	paths := m.cfg.Mesh.Paths()
	st := ManagerStatus{NAT: NATUnknown, Relays: map[string]string{}}
	for _, mem := range m.cfg.Members() {
		ps := PeerStatus{Name: mem.Name}
		for _, p := range paths {
			if p.Peer == mem.Name {
				ps.Paths = append(ps.Paths, p)
			}
		}
		if len(ps.Paths) > 0 {
			ps.Path, ps.Connected = ps.Paths[0], true
		}
		st.Peers = append(st.Peers, ps)
	}
	return st
}

// PeerIPs returns the public IPs of the peers this node has direct (not
// relayed) connections with: the only addresses this node's TURN server
// may relay to (ServerConfig.Peers). Fast and non-blocking.
func (m *Manager) PeerIPs() []netip.Addr {
	var out []netip.Addr
	for _, p := range m.cfg.Mesh.Paths() {
		if p.Kind == PathRelayed {
			continue
		}
		if ap, err := netip.ParseAddrPort(p.Remote); err == nil {
			out = append(out, ap.Addr().Unmap())
		}
	}
	return out
}

// Close stops the policy loop and releases the allocations. The mesh
// stays up.
func (m *Manager) Close() error {
	m.cancel()
	m.wg.Wait()
	return nil
}

var _ = net.ParseIP
