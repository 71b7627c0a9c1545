package relay

import (
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pion/transport/v2"
	"github.com/pion/transport/v2/stdnet"
	"github.com/pion/turn/v2"
)

// listenNet is pion's standard network with ServerConfig.ListenPacket.
type listenNet struct {
	*stdnet.Net
	listen func(network, address string) (net.PacketConn, error)
}

func (n listenNet) ListenPacket(network, address string) (net.PacketConn, error) {
	return n.listen(network, address)
}

// DefaultRealm is the TURN realm used when ServerConfig.Realm is empty.
const DefaultRealm = "circle"

// ServerConfig configures a TURN/STUN Server. Zero values of optional
// fields mean the default stated on the field.
type ServerConfig struct {
	// Secret is the circle secret (required, at least 16 bytes). TURN
	// credentials are checked against keys derived from it (see
	// Credentials).
	Secret []byte

	// PacketConn is the server's UDP socket (required), e.g. bound to
	// ":3478". The Server owns it from now on and closes it on Close.
	PacketConn net.PacketConn

	// RelayAddress is the IP address clients are told their relayed
	// addresses have: the node's public address (required).
	RelayAddress net.IP

	// RelayBindAddress is the local address relay sockets are bound to.
	// Default: RelayAddress.
	RelayBindAddress string

	// Peers returns the addresses of the circle's peers as this server
	// sees them (their public, server-reflexive addresses for NATed
	// peers): the only addresses an allocation may relay to. It is called for every
	// CreatePermission and ChannelBind request, from pion's read loop, so
	// it must be fast, must not block and must be safe for concurrent use.
	// Default: no peers (nothing is relayed).
	Peers func() []netip.Addr

	// ListenPacket opens the relay sockets of allocations (network "udp4"
	// or "udp", address RelayBindAddress:port). It is called from pion's
	// goroutines. Default net.ListenPacket. (Tests set it to open sockets
	// inside a network namespace.)
	ListenPacket func(network, address string) (net.PacketConn, error)

	// Realm is the TURN realm. Default DefaultRealm.
	Realm string

	// Now is the clock credentials are checked against. Default time.Now.
	Now func() time.Time

	// Logger receives the server's logs and pion's. Default: discard.
	Logger *slog.Logger
}

// Server is a TURN server (pion/turn/v2, UDP relays only: v2 servers do not
// relay TCP) that also answers STUN Binding requests on the same socket.
// Only clients holding credentials derived from the circle secret can
// allocate, and an allocation may only relay to circle peers: never to
// loopback, never to the server's own addresses, and to private ranges
// only where a circle peer sits.
type Server struct {
	cfg  ServerConfig
	turn *turn.Server
	own  map[netip.Addr]bool // the server's own addresses (read-only)

	// allowLoopback lets loopback peers through (tests only, where every
	// node is on 127.0.0.1).
	allowLoopback atomic.Bool

	mu     sync.Mutex // guards the following
	closed bool
}

// NewServer starts a TURN server on cfg.PacketConn.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.PacketConn == nil {
		return nil, fmt.Errorf("%w: server: packet conn is required", ErrInvalid)
	}
	if cfg.RelayAddress == nil || cfg.RelayAddress.IsUnspecified() {
		return nil, fmt.Errorf("%w: server: relay address is required", ErrInvalid)
	}
	key, err := turnKey(cfg.Secret)
	if err != nil {
		return nil, err
	}
	if cfg.Realm == "" {
		cfg.Realm = DefaultRealm
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Peers == nil {
		cfg.Peers = func() []netip.Addr { return nil }
	}
	if cfg.RelayBindAddress == "" {
		cfg.RelayBindAddress = cfg.RelayAddress.String()
	}
	cfg.Logger = orDiscard(cfg.Logger)
	s := &Server{cfg: cfg, own: ownAddrs(cfg)}
	var tnet transport.Net
	if cfg.ListenPacket != nil {
		std, err := stdnet.NewNet()
		if err != nil {
			return nil, fmt.Errorf("relay: turn server network: %w", err)
		}
		tnet = listenNet{Net: std, listen: cfg.ListenPacket}
	}
	ts, err := turn.NewServer(turn.ServerConfig{
		Realm:         cfg.Realm,
		LoggerFactory: pionLogs{cfg.Logger},
		AuthHandler: func(username, realm string, src net.Addr) ([]byte, bool) {
			if _, err := checkUsername(username, cfg.Now()); err != nil {
				cfg.Logger.Debug("turn: refused credentials", "from", src.String(), "err", err)
				return nil, false
			}
			return turn.GenerateAuthKey(username, realm, turnPassword(key, username)), true
		},
		PacketConnConfigs: []turn.PacketConnConfig{{
			PacketConn: cfg.PacketConn,
			RelayAddressGenerator: &turn.RelayAddressGeneratorStatic{
				RelayAddress: cfg.RelayAddress,
				Address:      cfg.RelayBindAddress,
				Net:          tnet,
			},
			PermissionHandler: s.permit,
		}},
	})
	if err != nil {
		return nil, fmt.Errorf("relay: starting turn server: %w", err)
	}
	s.turn = ts
	return s, nil
}

// ownAddrs collects the addresses that belong to the server itself: the
// relay address, the socket's address and every interface address.
func ownAddrs(cfg ServerConfig) map[netip.Addr]bool {
	own := map[netip.Addr]bool{}
	add := func(ip net.IP) {
		if a, ok := netip.AddrFromSlice(ip); ok {
			own[a.Unmap()] = true
		}
	}
	add(cfg.RelayAddress)
	add(net.ParseIP(cfg.RelayBindAddress))
	if ua, ok := cfg.PacketConn.LocalAddr().(*net.UDPAddr); ok {
		add(ua.IP)
	}
	if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok {
				add(n.IP)
			}
		}
	}
	return own
}

// permit is the PermissionHandler: it allows peerIP only if it is a circle
// peer, not loopback (unless allowLoopback), not unspecified, multicast or
// link-local, and not one of the server's own addresses.
func (s *Server) permit(client net.Addr, peerIP net.IP) bool {
	ok := s.allowed(peerIP)
	if !ok {
		s.cfg.Logger.Debug("turn: refused permission", "client", client.String(), "peer", peerIP.String())
	}
	return ok
}

func (s *Server) allowed(peerIP net.IP) bool {
	a, ok := netip.AddrFromSlice(peerIP)
	if !ok {
		return false
	}
	a = a.Unmap()
	switch {
	case a.IsUnspecified(), a.IsMulticast(), a.IsLinkLocalUnicast(), a.IsLinkLocalMulticast(),
		a.IsInterfaceLocalMulticast():
		return false
	case a.IsLoopback():
		if !s.allowLoopback.Load() {
			return false
		}
	case s.own[a]:
		return false
	}
	for _, p := range s.cfg.Peers() {
		if p.Unmap() == a {
			return true
		}
	}
	return false
}

// Addr returns the server's socket address.
func (s *Server) Addr() net.Addr { return s.cfg.PacketConn.LocalAddr() }

// Allocations returns the number of live allocations.
func (s *Server) Allocations() int { return s.turn.AllocationCount() }

// Close stops the server, closes its socket and all allocations. It is
// idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	return s.turn.Close()
}
