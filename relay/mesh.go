package relay

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
)

// Wire format of the mesh (protocol version 1). One QUIC connection per
// peer path, ALPN "circle-mesh/1", TLS 1.3 with certificates from the
// circle secret (certs.go). On it:
//
//   - Bidirectional streams carry services. The opener writes
//     version(1) | len(1) | service name (1..255 bytes); the acceptor
//     answers one status byte, 0 (accepted: from here on the stream is the
//     service's byte stream, both ways) or 1 (no such service: it then
//     closes the stream). A malformed header gets the stream reset with
//     error code 1.
//   - Unidirectional streams start with version(1) | type(1):
//     type 1 "hello": len(2, big endian) | JSON {"inc": the sender's
//     incarnation (random per Mesh), "addr": advertised address,
//     "via": relay node name if the sender's end is a TURN relay,
//     "kind": "punched" if the sender punched}; each side sends one
//     right after the handshake. A hello with a new incarnation closes
//     older connections from the same peer name (it restarted).
//     type 2 "packet": the rest of the stream is one packet (at most
//     64 KiB), used for packets too large for a datagram.
//   - Datagrams (RFC 9221) carry packets: version(1) | type 2 | packet.
//
// Versions (docs/INTERNALS.md, "Versions and upgrades"): the hello's body
// is JSON and grows by fields (unknown fields are ignored, also by the
// release before versioning, b4e49ea), so a hello of any header version
// from 1 up is read; capabilities of later releases go in new JSON fields.
// Unknown unidirectional stream types are ignored. Service stream headers
// and packets keep version 1 while nodes of b4e49ea may be in the circle
// (it resets other versions); an incompatible mesh protocol would be a new
// ALPN offered before "circle-mesh/1", which stays offered.
//
// Packets and streams are handed to the Transport (memberlist) and to
// listeners registered with Listen.
const (
	meshALPN    = "circle-mesh/1"
	meshVersion = 1

	uniHello  = 1
	uniPacket = 2

	maxPacket    = 64 << 10
	maxHello     = 4 << 10
	headerWait   = 5 * time.Second // bound on reading a stream's header
	errNoService = 1               // stream error code: no such service / bad header

	statusOK        = 0 // stream status byte: accepted
	statusNoService = 1 // stream status byte: no such service
	errClosing      = 0 // connection error code: mesh closing
	errDuplicate    = 2 // connection error code: duplicate connection retired
)

// Defaults used by DefaultMeshConfig and by NewMesh for zero fields.
const (
	DefaultHandshakeTimeout = 5 * time.Second
	DefaultKeepAlive        = 5 * time.Second
	DefaultIdleTimeout      = 20 * time.Second
)

// PathKind says how a connection reaches its peer.
type PathKind string

// Path kinds.
const (
	PathDirect  PathKind = "direct"  // straight to the peer's address
	PathPunched PathKind = "punched" // through a hole-punched NAT mapping (Punch, PunchVia)
	PathRelayed PathKind = "relayed" // through a TURN allocation on node Via (ours, or the peer's)
)

// MeshConfig configures a Mesh. Zero values of optional fields mean the
// default stated on the field.
type MeshConfig struct {
	// Name is this node's name (required, at most 255 bytes).
	Name string

	// Secret is the circle secret (required, at least 16 bytes).
	Secret []byte

	// Conn is the socket the mesh runs on (required): a plain UDP socket
	// or a TURN relay connection (Allocation.PacketConn). The Mesh reads
	// it exclusively; it closes it on Close unless Via is set (then the
	// Allocation owns it).
	Conn net.PacketConn

	// Via names the node whose TURN server Conn is relayed through, if it
	// is a relay connection; every path of this Mesh is then reported as
	// relayed via that node, on both ends. Default: direct.
	Via string

	// AdvertiseAddr is the host:port other nodes know this node by (its
	// memberlist address). Default: Conn's local address, which must then
	// be a specific IP.
	AdvertiseAddr string

	// TURN is the address (host:port) of this node's TURN server, if it
	// runs one (a relay); it is sent in hellos so that peers learn where
	// to allocate. Default: none.
	TURN string

	// HandshakeTimeout bounds a connection attempt. Default 5s.
	HandshakeTimeout time.Duration

	// KeepAlive is the QUIC keep-alive period; it holds NAT mappings open,
	// so it must stay well under 30 s. Default 5s.
	KeepAlive time.Duration

	// IdleTimeout closes a connection that heard nothing from its peer
	// for this long. Default 20s.
	IdleTimeout time.Duration

	// Logger receives the mesh's logs. Default: discard.
	Logger *slog.Logger
}

// DefaultMeshConfig returns a MeshConfig with every default filled in;
// Name, Secret and Conn must still be set.
func DefaultMeshConfig() MeshConfig {
	return MeshConfig{
		HandshakeTimeout: DefaultHandshakeTimeout,
		KeepAlive:        DefaultKeepAlive,
		IdleTimeout:      DefaultIdleTimeout,
	}
}

// PathInfo describes one live connection to a peer.
type PathInfo struct {
	Peer          string        // the peer's node name
	Kind          PathKind      // direct, punched or relayed
	Via           string        // for relayed paths: the node whose TURN server relays
	Remote        string        // the peer's address as seen on our socket
	Dialed        bool          // whether this node opened the connection
	RTT           time.Duration // smoothed round-trip time
	BytesSent     uint64        // on this connection, QUIC payload bytes
	BytesReceived uint64
	Since         time.Time // when the connection was established
	TURN          string    // the peer's TURN server address, if it runs one (from its hello)
	Inc           uint64    // the peer's incarnation (random per run of its Mesh, from its hello; 0 before)
}

// Mesh is one node's set of authenticated QUIC connections to its peers,
// all over one socket. Every method is safe for concurrent use.
type Mesh struct {
	cfg       MeshConfig
	caPub     ed25519.PublicKey
	cert      tls.Certificate
	advertise *net.UDPAddr
	quicConf  *quic.Config
	primary   *socket
	log       *slog.Logger
	ctx       context.Context // cancelled by Close
	cancel    context.CancelFunc
	wg        sync.WaitGroup // every goroutine the mesh starts
	stunMu    sync.Mutex     // serialises Reflexive (one reader of non-QUIC packets)
	inc       uint64         // this Mesh's incarnation (random), sent in hellos

	mu       sync.Mutex // guards the following
	closed   bool
	conns    map[string][]*meshConn        // by peer name, oldest first
	addrs    map[string]string             // advertised or dialed address -> peer name
	services map[string]*meshService       // by service name
	packets  func(from net.Addr, b []byte) // packet sink (the Transport), or nil
	dialing  map[string]time.Time          // peer -> start of the last automatic connect
	relays   map[string]*socket            // relay sockets by key (AddRelay: the relaying node's name)
	seq      uint64                        // last connection sequence number
	selfNAT  NATKind                       // this node's NAT kind, as the Manager measured it
	nats     map[string]NATKind            // peers' NAT kinds, as they reported them
}

// socket is one of the mesh's sockets with its QUIC transport.
type socket struct {
	conn net.PacketConn
	tr   *quic.Transport
	ln   *quic.Listener
	via  string // the relaying node for a TURN relay conn, else ""
	own  bool   // whether the mesh closes conn
}

// meshConn is one QUIC connection to a peer.
type meshConn struct {
	qc     *quic.Conn
	sock   *socket
	peer   string
	dialed bool
	since  time.Time

	seq uint64 // registration order (set under Mesh.mu, then read-only)

	mu        sync.Mutex // guards the following
	hello     bool       // the peer's hello arrived
	inc       uint64     // the peer's incarnation, from its hello
	kind      PathKind
	via       string
	advertise *net.UDPAddr // the peer's advertised address, from its hello
	turn      string       // the peer's TURN address, from its hello
}

// NewMesh starts a mesh on cfg.Conn: it accepts connections from peers at
// once.
func NewMesh(cfg MeshConfig) (*Mesh, error) {
	if cfg.Name == "" || len(cfg.Name) > 255 {
		return nil, fmt.Errorf("%w: mesh: name is required (at most 255 bytes)", ErrInvalid)
	}
	if cfg.Conn == nil {
		return nil, fmt.Errorf("%w: mesh: conn is required", ErrInvalid)
	}
	ca, err := meshCA(cfg.Secret)
	if err != nil {
		return nil, err
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if cfg.KeepAlive <= 0 {
		cfg.KeepAlive = DefaultKeepAlive
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = DefaultIdleTimeout
	}
	cfg.Logger = orDiscard(cfg.Logger)
	adv := cfg.AdvertiseAddr
	if adv == "" {
		adv = cfg.Conn.LocalAddr().String()
	}
	advertise, err := net.ResolveUDPAddr("udp", adv)
	if err != nil {
		return nil, fmt.Errorf("%w: mesh: advertise address %q: %w", ErrInvalid, adv, err)
	}
	if advertise.IP == nil || advertise.IP.IsUnspecified() || advertise.Port == 0 {
		return nil, fmt.Errorf("%w: mesh: advertise address %q needs a specific IP and port", ErrInvalid, adv)
	}
	cert, err := nodeCert(ca, cfg.Name, time.Now())
	if err != nil {
		return nil, fmt.Errorf("relay: mesh certificate: %w", err)
	}
	m := &Mesh{
		cfg:       cfg,
		caPub:     ca.Public().(ed25519.PublicKey),
		cert:      cert,
		advertise: advertise,
		log:       cfg.Logger.With("mesh", cfg.Name),
		quicConf: &quic.Config{
			HandshakeIdleTimeout:  cfg.HandshakeTimeout,
			MaxIdleTimeout:        cfg.IdleTimeout,
			KeepAlivePeriod:       cfg.KeepAlive,
			EnableDatagrams:       true,
			MaxIncomingStreams:    1024,
			MaxIncomingUniStreams: 1024,
		},
		conns:    map[string][]*meshConn{},
		addrs:    map[string]string{},
		services: map[string]*meshService{},
		dialing:  map[string]time.Time{},
		relays:   map[string]*socket{},
		nats:     map[string]NATKind{},
	}
	var inc [8]byte
	rand.Read(inc[:])
	m.inc = binary.BigEndian.Uint64(inc[:])
	m.services[IntroduceService] = &meshService{h: m.serveIntroduce}
	m.ctx, m.cancel = context.WithCancel(context.Background())
	sock, err := m.listen(cfg.Conn, cfg.Via, cfg.Via == "")
	if err != nil {
		m.cancel()
		return nil, err
	}
	m.primary = sock
	return m, nil
}

// listen starts a QUIC transport and accept loop on conn.
func (m *Mesh) listen(conn net.PacketConn, via string, own bool) (*socket, error) {
	sock := &socket{conn: conn, tr: &quic.Transport{Conn: conn}, via: via, own: own}
	ln, err := sock.tr.Listen(m.tlsConfig(""), m.quicConf)
	if err != nil {
		sock.tr.Close()
		return nil, fmt.Errorf("relay: mesh listen: %w", err)
	}
	sock.ln = ln
	if !m.goTracked(func() { m.acceptLoop(sock) }) {
		sock.close()
		return nil, ErrClosed
	}
	return sock, nil
}

// close stops the socket's transport (abruptly ending its connections;
// callers close them first) and closes conn if the mesh owns it.
func (s *socket) close() error {
	s.ln.Close()
	err := s.tr.Close()
	if s.own {
		if cerr := s.conn.Close(); err == nil {
			err = cerr
		}
	}
	return err
}

// AddRelay adds a TURN relay connection (Allocation.PacketConn) on node
// via as a second way to reach peers (ConnectVia); connections over it are
// reported as relayed via that node. The Allocation keeps owning conn;
// RemoveRelay or Close stop using it.
func (m *Mesh) AddRelay(via string, conn net.PacketConn) error {
	return m.addRelay(via, via, conn)
}

// addRelay adds a relay socket under key (the Manager holds two
// allocations on one relay while it replaces one).
func (m *Mesh) addRelay(key, via string, conn net.PacketConn) error {
	if via == "" || key == "" || conn == nil {
		return fmt.Errorf("%w: add relay: node name and conn are required", ErrInvalid)
	}
	m.mu.Lock()
	_, dup := m.relays[key]
	m.mu.Unlock()
	if dup || via == m.primary.via {
		return fmt.Errorf("%w: add relay: already have a relay via %q", ErrInvalid, via)
	}
	sock, err := m.listen(conn, via, false)
	if err != nil {
		return err
	}
	m.mu.Lock()
	if m.closed || m.relays[key] != nil {
		closed := m.closed
		m.mu.Unlock()
		sock.close()
		if closed {
			return ErrClosed
		}
		return fmt.Errorf("%w: add relay: already have a relay via %q", ErrInvalid, via)
	}
	m.relays[key] = sock
	m.mu.Unlock()
	return nil
}

// RemoveRelay closes the connections over the relay via and stops using
// its conn (which it does not close).
func (m *Mesh) RemoveRelay(via string) error {
	return m.removeRelay(via)
}

// removeRelay is RemoveRelay by key (see addRelay).
func (m *Mesh) removeRelay(via string) error {
	m.mu.Lock()
	sock := m.relays[via]
	delete(m.relays, via)
	var conns []*meshConn
	for _, list := range m.conns {
		for _, mc := range list {
			if sock != nil && mc.sock == sock {
				conns = append(conns, mc)
			}
		}
	}
	m.mu.Unlock()
	if sock == nil {
		return fmt.Errorf("%w: no relay via %q", ErrInvalid, via)
	}
	for _, mc := range conns {
		mc.qc.CloseWithError(errClosing, "relay removed")
	}
	return sock.close()
}

// tlsConfig returns the TLS configuration for dialing want (server side
// when want is "" and for accepting).
func (m *Mesh) tlsConfig(want string) *tls.Config {
	return &tls.Config{
		MinVersion:         tls.VersionTLS13,
		Certificates:       []tls.Certificate{m.cert},
		NextProtos:         []string{meshALPN},
		ServerName:         "circle-mesh",
		ClientAuth:         tls.RequireAnyClientCert,
		InsecureSkipVerify: true, // verifyPeer below replaces the WebPKI checks
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			_, err := verifyPeer(m.caPub, raw, m.cfg.Name, want, time.Now())
			return err
		},
	}
}

// Name returns this node's name.
func (m *Mesh) Name() string { return m.cfg.Name }

// Addr returns the address this node advertises.
func (m *Mesh) Addr() net.Addr { return m.advertise }

// goTracked runs f in a goroutine the mesh waits for on Close, unless the
// mesh is closed (then it reports false and does nothing).
func (m *Mesh) goTracked(f func()) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return false
	}
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		f()
	}()
	return true
}

func (m *Mesh) acceptLoop(sock *socket) {
	for {
		qc, err := sock.ln.Accept(m.ctx)
		if err != nil {
			return
		}
		name, err := peerNameOf(qc.ConnectionState().TLS)
		if err != nil {
			qc.CloseWithError(errClosing, "no peer name")
			continue
		}
		m.register(qc, name, false, sock, "", "")
	}
}

// Connect makes sure a connection to peer exists, dialing addr if there
// is none. An empty peer accepts whichever circle node answers at addr (its
// name is learnt from its certificate). It fails with an error wrapping
// ErrAuth if the node at addr cannot prove it holds the circle secret or is
// not peer.
func (m *Mesh) Connect(ctx context.Context, peer string, addr net.Addr) error {
	_, err := m.connect(ctx, peer, addr, m.primary, "", "")
	return err
}

// ConnectVia is Connect through the relay added with AddRelay(via, ...):
// addr is the peer's address as the relay reaches it (its public address).
// An existing connection to peer over that relay is reused.
func (m *Mesh) ConnectVia(ctx context.Context, peer, via string, addr net.Addr) error {
	m.mu.Lock()
	sock := m.relays[via]
	m.mu.Unlock()
	if sock == nil {
		return fmt.Errorf("%w: no relay via %q", ErrInvalid, via)
	}
	_, err := m.connect(ctx, peer, addr, sock, "", "")
	return err
}

// Punch opens a hole-punched path to peer at addr, its reflexive address
// (learnt out of band, e.g. over gossip): both nodes must call Punch at
// each other at about the same time, so that each one's outgoing QUIC
// Initial packets (retransmitted by QUIC) open its own NAT's mapping for
// the other. The connection runs over the mesh's primary socket and is
// reported as punched on both ends; it is preferred over relayed paths.
// If both attempts succeed the duplicate is retired. An existing punched
// path is reused only if it goes to addr (after a peer's public port
// changed, its old punched path is dead even if it has not timed out).
func (m *Mesh) Punch(ctx context.Context, peer string, addr net.Addr) error {
	if peer == "" {
		return fmt.Errorf("%w: punch: peer name is required", ErrInvalid)
	}
	_, err := m.connect(ctx, peer, addr, m.primary, PathPunched, "")
	return err
}

// connectRelayed dials addr, peer's relayed address on via's TURN server,
// from the primary socket: the path is reported as relayed via that node
// (the peer holds the allocation; see the "relay" introduction). An
// existing connection to the same address is reused.
func (m *Mesh) connectRelayed(ctx context.Context, peer, via string, addr net.Addr) error {
	if peer == "" || via == "" {
		return fmt.Errorf("%w: connect relayed: peer and relay names are required", ErrInvalid)
	}
	_, err := m.connect(ctx, peer, addr, m.primary, PathRelayed, via)
	return err
}

func (m *Mesh) connect(ctx context.Context, peer string, addr net.Addr, sock *socket, kind PathKind, via string) (*meshConn, error) {
	if peer == m.cfg.Name {
		return nil, fmt.Errorf("%w: connect: %q is this node", ErrInvalid, peer)
	}
	if peer == "" {
		peer = m.nameFor(addr.String())
	}
	if peer != "" {
		if mc := m.existing(peer, sock, kind, addr); mc != nil {
			return mc, nil
		}
	}
	m.mu.Lock()
	closed := m.closed
	m.mu.Unlock()
	if closed {
		return nil, ErrClosed
	}
	ctx, cancel := context.WithTimeout(ctx, m.cfg.HandshakeTimeout)
	defer cancel()
	qc, err := sock.tr.Dial(ctx, addr, m.tlsConfig(peer), m.quicConf)
	if err != nil {
		var te *quic.TransportError
		if errors.As(err, &te) && te.ErrorCode.IsCryptoError() {
			return nil, fmt.Errorf("%w: connecting to %s at %v: %w", ErrAuth, peer, addr, err)
		}
		return nil, fmt.Errorf("%w: connecting to %s at %v: %w", ErrNoPeer, peer, addr, err)
	}
	name, err := peerNameOf(qc.ConnectionState().TLS)
	if err != nil {
		qc.CloseWithError(errClosing, "no peer name")
		return nil, fmt.Errorf("%w: %w", ErrAuth, err)
	}
	mc := m.register(qc, name, true, sock, kind, via)
	if mc == nil {
		return nil, ErrClosed
	}
	m.mu.Lock()
	m.addrs[addr.String()] = name
	m.mu.Unlock()
	return mc, nil
}

// register adds an established connection and starts serving it. It
// returns nil (and closes qc) if the mesh is closed.
func (m *Mesh) register(qc *quic.Conn, name string, dialed bool, sock *socket, kind PathKind, via string) *meshConn {
	mc := &meshConn{qc: qc, sock: sock, peer: name, dialed: dialed, since: time.Now(), kind: PathDirect}
	switch {
	case sock.via != "":
		mc.kind, mc.via = PathRelayed, sock.via
	case kind != "":
		mc.kind, mc.via = kind, via
	}
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		qc.CloseWithError(errClosing, "mesh closed")
		return nil
	}
	m.seq++
	mc.seq = m.seq
	m.conns[name] = append(m.conns[name], mc)
	m.wg.Add(3)
	m.mu.Unlock()
	m.log.Debug("mesh: connected", "peer", name, "remote", qc.RemoteAddr().String(), "dialed", dialed)
	go m.serveStreams(mc)
	go m.serveUni(mc)
	go m.serveDatagrams(mc)
	return mc
}

// closeOtherIncarnations closes, at once, connections to mc's peer from an
// earlier run of it (another incarnation in their hello): that process is
// gone, whether or not its connection has timed out yet.
func (m *Mesh) closeOtherIncarnations(mc *meshConn) {
	m.mu.Lock()
	var stale []*meshConn
	for _, other := range m.conns[mc.peer] {
		if other == mc || other.seq > mc.seq {
			continue
		}
		other.mu.Lock()
		if other.hello && other.inc != mc.inc {
			stale = append(stale, other)
		}
		other.mu.Unlock()
	}
	m.mu.Unlock()
	for _, other := range stale {
		m.log.Debug("mesh: closing connection to an earlier run of the peer", "peer", other.peer)
		other.qc.CloseWithError(errDuplicate, "peer restarted")
	}
}

// closeDirectTo closes the connections to peer over the primary socket
// that are not relayed (a relay that restarted does not know them any
// more, but they only time out after IdleTimeout), and returns how many.
func (m *Mesh) closeDirectTo(peer string) int {
	m.mu.Lock()
	var stale []*meshConn
	for _, mc := range m.conns[peer] {
		if mc.sock != m.primary {
			continue
		}
		mc.mu.Lock()
		relayed := mc.kind == PathRelayed
		mc.mu.Unlock()
		if !relayed {
			stale = append(stale, mc)
		}
	}
	m.mu.Unlock()
	for _, mc := range stale {
		mc.qc.CloseWithError(errClosing, "no answer")
	}
	return len(stale)
}

// retireDuplicates is called once mc's path kind is final (its peer's
// hello arrived). See duplicateGrace.
func (m *Mesh) retireDuplicates(mc *meshConn) {
	if m.cfg.Name > mc.peer {
		return // the peer decides
	}
	m.mu.Lock()
	type pair struct{ old, newer *meshConn }
	var dups []pair
	for _, other := range m.conns[mc.peer] {
		if other == mc || other.qc.Context().Err() != nil {
			continue
		}
		if other.seq > mc.seq {
			if other.settled() && other.samePath(mc) {
				dups = append(dups, pair{mc, other})
			}
		} else if other.sock == mc.sock && (!other.settled() || other.samePath(mc)) {
			// An older connection whose hello never came is presumed
			// stale; retire re-checks it after the grace period.
			dups = append(dups, pair{other, mc})
		}
	}
	if m.closed {
		dups = nil
	}
	m.wg.Add(len(dups))
	m.mu.Unlock()
	for _, d := range dups {
		go m.retire(d.old, d.newer)
	}
}

// Duplicate connections (two nodes dialing each other at once, or a peer
// reconnecting while its old connection still looks alive to us): of two
// live connections between two nodes over the same socket and the same
// kind of path (relayed via the same node, or not relayed: direct and
// punched count as one), the node with the smaller name closes the older
// one, by its own order, after duplicateGrace, so streams in flight on it
// can finish; new streams already go to the newer one (best picks the
// newest). Only one side decides, so both never close both. The check
// waits for the peer's hello, which settles the path kind.
const duplicateGrace = 2 * time.Second

// retire closes old, a duplicate of newer, after duplicateGrace, unless
// old's hello arrived meanwhile and shows another kind of path. Called with
// m.wg held for it.
func (m *Mesh) retire(old, newer *meshConn) {
	defer m.wg.Done()
	t := time.NewTimer(duplicateGrace)
	defer t.Stop()
	select {
	case <-t.C:
		if old.settled() && !old.samePath(newer) {
			return
		}
		m.log.Debug("mesh: closing duplicate connection", "peer", old.peer)
		old.qc.CloseWithError(errDuplicate, "duplicate connection")
	case <-old.qc.Context().Done():
	case <-m.ctx.Done():
	}
}

// settled reports whether the peer's hello arrived (so kind is final).
func (mc *meshConn) settled() bool {
	mc.mu.Lock()
	defer mc.mu.Unlock()
	return mc.hello
}

// samePath reports whether mc and other are duplicates: same socket, and
// relayed via the same node or both not relayed.
func (mc *meshConn) samePath(other *meshConn) bool {
	if mc.sock != other.sock {
		return false
	}
	mc.mu.Lock()
	k, v := mc.kind, mc.via
	mc.mu.Unlock()
	other.mu.Lock()
	defer other.mu.Unlock()
	relayed := k == PathRelayed
	return relayed == (other.kind == PathRelayed) && v == other.via
}

// unregister drops a connection that ended.
func (m *Mesh) unregister(mc *meshConn) {
	m.mu.Lock()
	defer m.mu.Unlock()
	list := m.conns[mc.peer]
	for i, c := range list {
		if c == mc {
			list = append(list[:i:i], list[i+1:]...)
			break
		}
	}
	if len(list) == 0 {
		delete(m.conns, mc.peer)
	} else {
		m.conns[mc.peer] = list
	}
	m.log.Debug("mesh: disconnected", "peer", mc.peer)
}

// best returns the connection to use for peer: a live one, direct before
// punched before relayed, newest first; nil if there is none.
func (m *Mesh) best(peer string) *meshConn {
	m.mu.Lock()
	defer m.mu.Unlock()
	var best *meshConn
	rank := func(mc *meshConn) int {
		mc.mu.Lock()
		defer mc.mu.Unlock()
		switch mc.kind {
		case PathDirect:
			return 0
		case PathPunched:
			return 1
		}
		return 2
	}
	for _, mc := range m.conns[peer] {
		if mc.qc.Context().Err() != nil {
			continue
		}
		if best == nil || rank(mc) <= rank(best) {
			best = mc
		}
	}
	return best
}

// existing returns a live connection to peer over sock that an attempt
// of kind to addr can reuse, or nil. On a relay socket any connection
// does. On the primary socket: a direct one always (it is at least as
// good); a punched one for a plain or punched attempt, the latter only if
// it goes to addr; a relayed one (to a peer's relayed address) only for a
// relayed attempt to the same address.
func (m *Mesh) existing(peer string, sock *socket, kind PathKind, addr net.Addr) *meshConn {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, mc := range m.conns[peer] {
		if mc.sock != sock || mc.qc.Context().Err() != nil {
			continue
		}
		if sock.via != "" {
			return mc
		}
		mc.mu.Lock()
		k := mc.kind
		mc.mu.Unlock()
		sameAddr := addr != nil && mc.qc.RemoteAddr().String() == addr.String()
		switch {
		case k == PathDirect && kind != PathRelayed:
			return mc
		case k == PathPunched && (kind == "" || kind == PathPunched && sameAddr):
			return mc
		case k == PathRelayed && kind == PathRelayed && sameAddr:
			return mc
		}
	}
	return nil
}

// nameFor returns the peer name known for an address, or "".
func (m *Mesh) nameFor(addr string) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.addrs[addr]
}

func (m *Mesh) serveStreams(mc *meshConn) {
	defer m.wg.Done()
	defer m.unregister(mc)
	for {
		s, err := mc.qc.AcceptStream(m.ctx)
		if err != nil {
			return
		}
		m.goTracked(func() { m.handleStream(mc, s) })
	}
}

// handleStream reads a stream's header and hands it to its service.
func (m *Mesh) handleStream(mc *meshConn, s *quic.Stream) {
	s.SetReadDeadline(time.Now().Add(headerWait))
	var hdr [2]byte
	if _, err := io.ReadFull(s, hdr[:]); err != nil || hdr[0] != meshVersion || hdr[1] == 0 {
		s.CancelRead(errNoService)
		s.CancelWrite(errNoService)
		return
	}
	name := make([]byte, hdr[1])
	if _, err := io.ReadFull(s, name); err != nil {
		s.CancelRead(errNoService)
		s.CancelWrite(errNoService)
		return
	}
	s.SetReadDeadline(time.Time{})
	m.mu.Lock()
	svc := m.services[string(name)]
	m.mu.Unlock()
	s.SetWriteDeadline(time.Now().Add(headerWait))
	if svc == nil {
		m.log.Debug("mesh: stream for unknown service", "peer", mc.peer, "service", string(name))
		s.Write([]byte{statusNoService})
		s.CancelRead(errNoService)
		s.Close()
		return
	}
	if _, err := s.Write([]byte{statusOK}); err != nil {
		s.CancelRead(errNoService)
		s.CancelWrite(errNoService)
		return
	}
	s.SetWriteDeadline(time.Time{})
	svc.h(m.streamConn(mc, s))
}

func (m *Mesh) serveUni(mc *meshConn) {
	defer m.wg.Done()
	// Introduce ourselves first.
	if err := m.sendHello(mc); err != nil {
		m.log.Debug("mesh: sending hello", "peer", mc.peer, "err", err)
	}
	for {
		s, err := mc.qc.AcceptUniStream(m.ctx)
		if err != nil {
			return
		}
		m.goTracked(func() { m.handleUni(mc, s) })
	}
}

type hello struct {
	Inc  uint64   `json:"inc"` // the sender's incarnation: random per Mesh
	Addr string   `json:"addr"`
	Via  string   `json:"via,omitempty"`  // the sender's end runs over a relay on this node
	Kind PathKind `json:"kind,omitempty"` // "punched" when the sender punched this path
	TURN string   `json:"turn,omitempty"` // the sender's TURN server address, if it runs one
}

func (m *Mesh) sendHello(mc *meshConn) error {
	mc.mu.Lock()
	h := hello{Inc: m.inc, Addr: m.advertise.String(), Via: mc.sock.via, TURN: m.cfg.TURN}
	if mc.kind == PathPunched {
		h.Kind = PathPunched
	}
	mc.mu.Unlock()
	body, err := json.Marshal(h)
	if err != nil {
		return err
	}
	s, err := mc.qc.OpenUniStream()
	if err != nil {
		return err
	}
	buf := make([]byte, 0, 4+len(body))
	buf = append(buf, meshVersion, uniHello)
	buf = binary.BigEndian.AppendUint16(buf, uint16(len(body)))
	buf = append(buf, body...)
	s.SetWriteDeadline(time.Now().Add(headerWait))
	if _, err := s.Write(buf); err != nil {
		s.CancelWrite(0)
		return err
	}
	return s.Close()
}

func (m *Mesh) handleUni(mc *meshConn, s *quic.ReceiveStream) {
	defer s.CancelRead(0)
	s.SetReadDeadline(time.Now().Add(headerWait))
	var hdr [2]byte
	if _, err := io.ReadFull(s, hdr[:]); err != nil || hdr[0] == 0 {
		return
	}
	switch {
	case hdr[1] == uniHello: // JSON: any version from 1 up (see the wire format)
		var n [2]byte
		if _, err := io.ReadFull(s, n[:]); err != nil {
			return
		}
		l := int(binary.BigEndian.Uint16(n[:]))
		if l > maxHello {
			return
		}
		body := make([]byte, l)
		if _, err := io.ReadFull(s, body); err != nil {
			return
		}
		var h hello
		if err := json.Unmarshal(body, &h); err != nil {
			return
		}
		m.gotHello(mc, h)
	case hdr[1] == uniPacket && hdr[0] == meshVersion:
		b, err := io.ReadAll(io.LimitReader(s, maxPacket+1))
		if err != nil || len(b) > maxPacket {
			return
		}
		m.deliver(mc, b)
	default:
		m.log.Debug("ignoring a unidirectional stream of a later release", "peer", mc.peer, "version", hdr[0], "type", hdr[1])
	}
}

func (m *Mesh) gotHello(mc *meshConn, h hello) {
	addr, err := net.ResolveUDPAddr("udp", h.Addr)
	mc.mu.Lock()
	if err == nil {
		mc.advertise = addr
	}
	switch {
	case h.Via != "":
		mc.kind, mc.via = PathRelayed, h.Via
	case h.Kind == PathPunched && mc.kind == PathDirect:
		mc.kind = PathPunched
	}
	mc.turn = h.TURN
	first := !mc.hello
	mc.hello = true
	mc.inc = h.Inc
	mc.mu.Unlock()
	if first {
		m.closeOtherIncarnations(mc)
		defer m.retireDuplicates(mc)
	}
	if err == nil {
		m.mu.Lock()
		m.addrs[addr.String()] = mc.peer
		m.mu.Unlock()
	}
}

func (m *Mesh) serveDatagrams(mc *meshConn) {
	defer m.wg.Done()
	for {
		b, err := mc.qc.ReceiveDatagram(m.ctx)
		if err != nil {
			return
		}
		if len(b) < 2 || b[0] != meshVersion || b[1] != uniPacket {
			continue
		}
		m.deliver(mc, b[2:])
	}
}

// deliver hands a packet from mc's peer to the packet sink.
func (m *Mesh) deliver(mc *meshConn, b []byte) {
	m.mu.Lock()
	sink := m.packets
	m.mu.Unlock()
	if sink != nil {
		sink(mc.from(), b)
	}
}

// from is the address the peer is known by: its advertised address once
// its hello arrived, else its address on our socket.
func (mc *meshConn) from() net.Addr {
	mc.mu.Lock()
	defer mc.mu.Unlock()
	if mc.advertise != nil {
		return mc.advertise
	}
	return mc.qc.RemoteAddr()
}

// SendPacket sends one unreliable packet to peer: a QUIC datagram, or a
// unidirectional stream if it is too large for one.
func (m *Mesh) SendPacket(peer string, b []byte) error {
	if len(b) > maxPacket {
		return fmt.Errorf("%w: packet of %d bytes", ErrInvalid, len(b))
	}
	mc := m.best(peer)
	if mc == nil {
		return fmt.Errorf("%w: %s", ErrNoPeer, peer)
	}
	msg := make([]byte, 0, 2+len(b))
	msg = append(msg, meshVersion, uniPacket)
	msg = append(msg, b...)
	err := mc.qc.SendDatagram(msg)
	var tooLarge *quic.DatagramTooLargeError
	if !errors.As(err, &tooLarge) {
		return err
	}
	s, err := mc.qc.OpenUniStream()
	if err != nil {
		return err
	}
	s.SetWriteDeadline(time.Now().Add(headerWait))
	if _, err := s.Write(msg); err != nil {
		s.CancelWrite(0)
		return err
	}
	return s.Close()
}

// Dial opens a stream to service on peer and waits for the peer to accept
// it (one round trip); it fails with an error wrapping ErrNoService if
// nothing listens for service there, and ErrNoPeer if no connection to
// peer exists (see Connect). The returned conn's Close ends both
// directions.
func (m *Mesh) Dial(ctx context.Context, peer, service string) (net.Conn, error) {
	if service == "" || len(service) > 255 {
		return nil, fmt.Errorf("%w: service name %q", ErrInvalid, service)
	}
	mc := m.best(peer)
	if mc == nil {
		return nil, fmt.Errorf("%w: %s", ErrNoPeer, peer)
	}
	s, err := mc.qc.OpenStreamSync(ctx)
	if err != nil {
		return nil, fmt.Errorf("relay: opening stream to %s: %w", peer, err)
	}
	hdr := append([]byte{meshVersion, byte(len(service))}, service...)
	if dl, ok := ctx.Deadline(); ok {
		s.SetWriteDeadline(dl)
	}
	if _, err := s.Write(hdr); err != nil {
		s.CancelRead(0)
		s.CancelWrite(0)
		return nil, fmt.Errorf("relay: opening stream to %s: %w", peer, err)
	}
	var status [1]byte
	dl, ok := ctx.Deadline()
	if !ok {
		dl = time.Now().Add(2 * headerWait) // the peer answers within headerWait
	}
	s.SetReadDeadline(dl)
	if _, err := io.ReadFull(s, status[:]); err != nil {
		s.CancelRead(0)
		s.CancelWrite(0)
		return nil, fmt.Errorf("relay: opening stream to %s: %w", peer, err)
	}
	if status[0] != statusOK {
		s.CancelRead(0)
		s.CancelWrite(0)
		return nil, fmt.Errorf("%w: %q on %s", ErrNoService, service, peer)
	}
	s.SetReadDeadline(time.Time{})
	s.SetWriteDeadline(time.Time{})
	return m.streamConn(mc, s), nil
}

// DialAny opens a stream to service on the first of peers that accepts it,
// in order, skipping peers without a connection or without the service;
// it returns the stream and the peer that took it. This is how a request
// fails over between nodes offering the same service.
func (m *Mesh) DialAny(ctx context.Context, peers []string, service string) (net.Conn, string, error) {
	errs := make([]error, 0, len(peers))
	for _, p := range peers {
		c, err := m.Dial(ctx, p, service)
		if err == nil {
			return c, p, nil
		}
		errs = append(errs, err)
		if ctx.Err() != nil {
			break
		}
	}
	if len(errs) == 0 {
		return nil, "", fmt.Errorf("%w: no peers offer %q", ErrNoService, service)
	}
	return nil, "", errors.Join(errs...)
}

// Handle registers h for streams of service (replacing any previous
// handler; nil removes it). h runs in its own goroutine per stream and owns
// the conn; it must return once the conn fails, which happens at the latest
// when the mesh closes (Close waits for it).
func (m *Mesh) Handle(service string, h func(net.Conn)) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if h == nil {
		delete(m.services, service)
		return
	}
	m.services[service] = &meshService{h: h}
}

// meshService is a registered stream handler.
type meshService struct{ h func(net.Conn) }

// Listen returns a listener for streams of service; closing it unregisters
// the service.
func (m *Mesh) Listen(service string) (net.Listener, error) {
	if service == "" || len(service) > 255 {
		return nil, fmt.Errorf("%w: service name %q", ErrInvalid, service)
	}
	l := &serviceListener{m: m, service: service, ch: make(chan net.Conn), done: make(chan struct{})}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, ErrClosed
	}
	if _, ok := m.services[service]; ok {
		return nil, fmt.Errorf("%w: service %q already has a handler", ErrInvalid, service)
	}
	l.entry = &meshService{h: l.handle}
	m.services[service] = l.entry
	return l, nil
}

// Paths reports every live connection, by peer name then age.
func (m *Mesh) Paths() []PathInfo {
	m.mu.Lock()
	var all []*meshConn
	for _, list := range m.conns {
		all = append(all, list...)
	}
	m.mu.Unlock()
	out := make([]PathInfo, 0, len(all))
	for _, mc := range all {
		if mc.qc.Context().Err() != nil {
			continue
		}
		st := mc.qc.ConnectionStats()
		mc.mu.Lock()
		out = append(out, PathInfo{
			Peer: mc.peer, Kind: mc.kind, Via: mc.via, Remote: mc.qc.RemoteAddr().String(),
			Dialed: mc.dialed, RTT: st.SmoothedRTT, BytesSent: st.BytesSent,
			BytesReceived: st.BytesReceived, Since: mc.since, TURN: mc.turn, Inc: mc.inc,
		})
		mc.mu.Unlock()
	}
	sortPaths(out)
	return out
}

// Peers returns the names of the peers with a live connection.
func (m *Mesh) Peers() []string {
	seen := map[string]bool{}
	var out []string
	for _, p := range m.Paths() {
		if !seen[p.Peer] {
			seen[p.Peer] = true
			out = append(out, p.Peer)
		}
	}
	return out
}

// Close closes every connection (telling peers), stops accepting, closes
// Conn (unless Via is set) and waits for the mesh's goroutines, including
// running stream handlers. It is idempotent.
func (m *Mesh) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	var all []*meshConn
	for _, list := range m.conns {
		all = append(all, list...)
	}
	socks := []*socket{m.primary}
	for _, s := range m.relays {
		socks = append(socks, s)
	}
	m.relays = map[string]*socket{}
	m.mu.Unlock()
	m.cancel()
	for _, mc := range all {
		mc.qc.CloseWithError(errClosing, "mesh closed")
	}
	var err error
	for _, s := range socks {
		if cerr := s.close(); err == nil {
			err = cerr
		}
	}
	m.wg.Wait()
	return err
}
