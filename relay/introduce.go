package relay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"time"
)

// Introductions (rendezvous for hole punching). A node that two peers
// both reach directly sees each one's public address: the source address
// of its connection, i.e. the NAT mapping of that peer's mesh socket. On
// the IntroduceService stream (a mesh service every Mesh serves) a node A
// asks such a node R for peer B; R tells B to punch towards A's address
// and answers A with B's, and both Punch at once.
//
// Wire format: JSON objects on an IntroduceService stream, one request and
// one reply (two of each for "relay"). Every request may carry "nat", the
// sender's NAT kind as its Manager measured it (NATKind); R remembers what
// each peer reported and passes it on, so nodes learn which peers need a
// relay.
//
//	A -> R: {"v":1,"op":"introduce","peer":"B"}
//	R -> B: {"v":1,"op":"punch","peer":"A","addr":"<A's address at R>"}
//	reply:  {"v":1,"addr":"<B's address at R>","nat":"<B's kind>"} (to
//	        introduce), {"v":1} (to punch), or {"v":1,"error":"..."}
//
// R refuses the introduction (an error, with "nat") when either side
// reported a symmetric NAT: punching cannot work then.
//
// "observe" (NAT detection): R answers the address A's connection comes
// from, R's own NAT kind and every kind it has been told:
//
//	A -> R: {"v":1,"op":"observe","nat":"cone"}
//	reply:  {"v":1,"addr":"<A's address at R>","nat":"none","nats":{"B":"cone"}}
//
// "relay" (a relayed path through H's TURN allocation on R, for a peer O
// that cannot be punched): H tells R its relayed address Y on R; R answers
// O's public address, H creates the TURN permission for O's IP, says "go",
// and R tells O to dial Y from its primary socket (O's NAT then lets the
// relay's answers in). Both ends report the path as relayed via R.
//
//	H -> R: {"v":1,"op":"relay","peer":"O","addr":"<Y>","nat":"symmetric"}
//	R -> H: {"v":1,"addr":"<O's address at R>","nat":"<O's kind>"}
//	H -> R: {"v":1,"op":"go"}
//	R -> O: {"v":1,"op":"connect","peer":"H","addr":"<Y>","nat":"symmetric"}
//	O -> R: {"v":1}
//	R -> H: {"v":1} (O is dialing) or {"v":1,"error":"..."}
const IntroduceService = "circle-introduce"

const maxIntroduceMsg = 64 << 10

type introMsg struct {
	V     int                `json:"v"`
	Op    string             `json:"op,omitempty"`
	Peer  string             `json:"peer,omitempty"`
	Addr  string             `json:"addr,omitempty"`
	NAT   NATKind            `json:"nat,omitempty"`
	NATs  map[string]NATKind `json:"nats,omitempty"`
	Error string             `json:"error,omitempty"`
	// NoPath marks an error reply of an introducer that lacks a direct
	// path to a node the request needs (cheap to retry soon).
	NoPath bool `json:"nopath,omitempty"`
}

// errIntroducerNoPath is wrapped by errors from introductions the
// introducer refused for want of a direct path to a node.
var errIntroducerNoPath = errors.New("the introducer lacks a direct path")

// exchange writes msg on c and reads the answer, within d.
func exchange(c net.Conn, msg introMsg, d time.Duration) (introMsg, error) {
	c.SetDeadline(time.Now().Add(d))
	if err := json.NewEncoder(c).Encode(msg); err != nil {
		return introMsg{}, err
	}
	var res introMsg
	if err := json.NewDecoder(io.LimitReader(c, maxIntroduceMsg)).Decode(&res); err != nil {
		return introMsg{}, err
	}
	if res.NoPath {
		return res, fmt.Errorf("relay: %s: %w", res.Error, errIntroducerNoPath)
	}
	if res.Error != "" {
		return res, fmt.Errorf("relay: %s", res.Error)
	}
	return res, nil
}

// PunchVia opens a punched path to peer with the help of introducer, a node
// both reach directly (typically a reachable node): it learns peer's public
// address from introducer, which also asks peer to punch towards ours, and
// then Punches. It fails if introducer has no direct path to peer.
func (m *Mesh) PunchVia(ctx context.Context, peer, introducer string) error {
	c, err := m.Dial(ctx, introducer, IntroduceService)
	if err != nil {
		return err
	}
	defer c.Close()
	res, err := exchange(c, introMsg{V: meshVersion, Op: "introduce", Peer: peer, NAT: m.natOf("")}, m.cfg.HandshakeTimeout)
	m.learnNAT(peer, res.NAT)
	if err != nil {
		return fmt.Errorf("relay: introduction to %s by %s: %w", peer, introducer, err)
	}
	addr, err := net.ResolveUDPAddr("udp", res.Addr)
	if err != nil {
		return fmt.Errorf("relay: introduction to %s by %s: bad address %q", peer, introducer, res.Addr)
	}
	return m.Punch(ctx, peer, addr)
}

// ask sends msg to peer's IntroduceService and returns its answer, all
// within the handshake timeout.
func (m *Mesh) ask(peer string, msg introMsg) (introMsg, error) {
	ctx, cancel := context.WithTimeout(m.ctx, m.cfg.HandshakeTimeout)
	defer cancel()
	pc, err := m.Dial(ctx, peer, IntroduceService)
	if err != nil {
		return introMsg{}, err
	}
	defer pc.Close()
	msg.V = meshVersion
	return exchange(pc, msg, m.cfg.HandshakeTimeout)
}

// observed returns the address peer's direct (or punched) connection to
// us comes from, on our primary socket.
func (m *Mesh) observed(peer string) (net.Addr, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, mc := range m.conns[peer] {
		if mc.sock != m.primary || mc.qc.Context().Err() != nil {
			continue
		}
		mc.mu.Lock()
		relayed := mc.kind == PathRelayed
		mc.mu.Unlock()
		if !relayed {
			return mc.qc.RemoteAddr(), true
		}
	}
	return nil, false
}

// serveIntroduce is the IntroduceService handler.
func (m *Mesh) serveIntroduce(c net.Conn) {
	defer c.Close()
	from := ""
	if sc, ok := c.(*streamConn); ok {
		from = sc.peer
	}
	c.SetDeadline(time.Now().Add(m.cfg.HandshakeTimeout))
	dec := json.NewDecoder(io.LimitReader(c, 2*maxIntroduceMsg))
	var req introMsg
	if err := dec.Decode(&req); err != nil {
		return
	}
	switch req.Op {
	case "punch", "connect":
		m.learnNAT(req.Peer, req.NAT) // the kind of the node we are asked to reach
	default:
		m.learnNAT(from, req.NAT) // the requester's own
	}
	reply := func(msg introMsg) {
		msg.V = meshVersion
		json.NewEncoder(c).Encode(msg)
	}
	switch req.Op {
	case "introduce":
		fromAddr, ok1 := m.observed(from)
		peerAddr, ok2 := m.observed(req.Peer)
		if !ok1 || !ok2 || req.Peer == from {
			reply(introMsg{Error: fmt.Sprintf("%s has no direct paths to both %s and %s", m.cfg.Name, from, req.Peer), NAT: m.natOf(req.Peer), NoPath: true})
			return
		}
		if m.natOf(req.Peer) == NATSymmetric || m.natOf(from) == NATSymmetric {
			reply(introMsg{Error: "cannot punch a symmetric NAT", NAT: m.natOf(req.Peer)})
			return
		}
		if _, err := m.ask(req.Peer, introMsg{Op: "punch", Peer: from, Addr: fromAddr.String(), NAT: m.natOf(from)}); err != nil {
			reply(introMsg{Error: err.Error(), NAT: m.natOf(req.Peer)})
			return
		}
		reply(introMsg{Addr: peerAddr.String(), NAT: m.natOf(req.Peer)})
	case "punch":
		addr, err := net.ResolveUDPAddr("udp", req.Addr)
		if err != nil || req.Peer == "" {
			reply(introMsg{Error: "bad punch request"})
			return
		}
		reply(introMsg{})
		m.goTracked(func() {
			ctx, cancel := context.WithTimeout(m.ctx, m.cfg.HandshakeTimeout)
			defer cancel()
			if err := m.Punch(ctx, req.Peer, addr); err != nil {
				m.log.Debug("mesh: punch on request failed", "peer", req.Peer, "addr", req.Addr, "err", err)
			}
		})
	case "observe":
		addr, ok := m.observed(from)
		if !ok {
			reply(introMsg{Error: fmt.Sprintf("%s has no direct path to %s", m.cfg.Name, from), NoPath: true})
			return
		}
		reply(introMsg{Addr: addr.String(), NAT: m.natOf(""), NATs: m.natsKnown()})
	case "relay":
		m.serveRelay(c, dec, from, req, reply)
	case "connect":
		addr, err := net.ResolveUDPAddr("udp", req.Addr)
		if err != nil || req.Peer == "" || from == "" {
			reply(introMsg{Error: "bad connect request"})
			return
		}
		reply(introMsg{})
		m.goTracked(func() {
			ctx, cancel := context.WithTimeout(m.ctx, m.cfg.HandshakeTimeout)
			defer cancel()
			if err := m.connectRelayed(ctx, req.Peer, from, addr); err != nil {
				m.log.Debug("mesh: relayed connect on request failed", "peer", req.Peer, "via", from, "addr", req.Addr, "err", err)
			}
		})
	default:
		reply(introMsg{Error: "unknown op " + req.Op})
	}
}

// serveRelay is the relaying node's side of a "relay" introduction (see
// the wire format above): from holds an allocation on this node's TURN
// server at req.Addr and wants req.Peer to dial it.
func (m *Mesh) serveRelay(c net.Conn, dec *json.Decoder, from string, req introMsg, reply func(introMsg)) {
	peerAddr, ok := m.observed(req.Peer)
	if !ok || req.Peer == from || from == "" {
		reply(introMsg{Error: fmt.Sprintf("%s has no direct path to %s", m.cfg.Name, req.Peer), NoPath: true})
		return
	}
	if _, err := net.ResolveUDPAddr("udp", req.Addr); err != nil {
		reply(introMsg{Error: "bad relayed address"})
		return
	}
	reply(introMsg{Addr: peerAddr.String(), NAT: m.natOf(req.Peer)})
	c.SetDeadline(time.Now().Add(m.cfg.HandshakeTimeout))
	var goMsg introMsg
	if err := dec.Decode(&goMsg); err != nil || goMsg.Op != "go" {
		return
	}
	if _, err := m.ask(req.Peer, introMsg{Op: "connect", Peer: from, Addr: req.Addr, NAT: m.natOf(from)}); err != nil {
		reply(introMsg{Error: err.Error()})
		return
	}
	reply(introMsg{})
}

// observe asks via (a node this one reaches directly) which address our
// connection comes from, reporting our NAT kind; it returns that address
// and via's own NAT kind, and learns the kinds via knows.
func (m *Mesh) observe(ctx context.Context, via string) (netip.AddrPort, NATKind, error) {
	c, err := m.Dial(ctx, via, IntroduceService)
	if err != nil {
		return netip.AddrPort{}, "", err
	}
	defer c.Close()
	res, err := exchange(c, introMsg{V: meshVersion, Op: "observe", NAT: m.natOf("")}, m.cfg.HandshakeTimeout)
	if err != nil {
		return netip.AddrPort{}, "", fmt.Errorf("relay: observe at %s: %w", via, err)
	}
	for peer, k := range res.NATs {
		if peer != m.cfg.Name {
			m.learnNAT(peer, k)
		}
	}
	m.learnNAT(via, res.NAT)
	ap, err := netip.ParseAddrPort(res.Addr)
	if err != nil {
		return netip.AddrPort{}, "", fmt.Errorf("relay: observe at %s: bad address %q", via, res.Addr)
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), res.NAT, nil
}

// requestRelay is the holder's side of a "relay" introduction through
// via, where this node's allocation has relayed address relayAddr: permit
// is called with peer's public address (to create the TURN permission)
// before via tells peer to dial relayAddr.
func (m *Mesh) requestRelay(ctx context.Context, via, peer string, relayAddr net.Addr, permit func(net.Addr) error) error {
	c, err := m.Dial(ctx, via, IntroduceService)
	if err != nil {
		return err
	}
	defer c.Close()
	res, err := exchange(c, introMsg{V: meshVersion, Op: "relay", Peer: peer, Addr: relayAddr.String(), NAT: m.natOf("")}, m.cfg.HandshakeTimeout)
	m.learnNAT(peer, res.NAT)
	if err != nil {
		return fmt.Errorf("relay: relayed introduction to %s by %s: %w", peer, via, err)
	}
	addr, err := net.ResolveUDPAddr("udp", res.Addr)
	if err != nil {
		return fmt.Errorf("relay: relayed introduction to %s by %s: bad address %q", peer, via, res.Addr)
	}
	if err := permit(addr); err != nil {
		return fmt.Errorf("relay: permission for %s on %s: %w", addr, via, err)
	}
	if _, err := exchange(c, introMsg{V: meshVersion, Op: "go"}, m.cfg.HandshakeTimeout); err != nil {
		return fmt.Errorf("relay: relayed introduction to %s by %s: %w", peer, via, err)
	}
	return nil
}

// natOf returns the NAT kind peer reported ("" for this node: the kind
// the Manager set), or "" if unknown.
func (m *Mesh) natOf(peer string) NATKind {
	m.mu.Lock()
	defer m.mu.Unlock()
	if peer == "" {
		return m.selfNAT
	}
	return m.nats[peer]
}

// learnNAT records peer's NAT kind (ignoring unknown ones).
func (m *Mesh) learnNAT(peer string, k NATKind) {
	switch k {
	case NATNone, NATCone, NATSymmetric:
	default:
		return
	}
	if peer == "" || peer == m.cfg.Name {
		return
	}
	m.mu.Lock()
	m.nats[peer] = k
	m.mu.Unlock()
}

// setNAT records this node's NAT kind, reported in introductions.
func (m *Mesh) setNAT(k NATKind) {
	m.mu.Lock()
	m.selfNAT = k
	m.mu.Unlock()
}

// natsKnown returns the NAT kinds of the peers this node has a live
// connection to.
func (m *Mesh) natsKnown() map[string]NATKind {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := map[string]NATKind{}
	for peer := range m.conns {
		if k, ok := m.nats[peer]; ok {
			out[peer] = k
		}
	}
	return out
}

// closePunched closes every punched connection (after this node's public
// address changed they are dead: peers send to the old mapping).
func (m *Mesh) closePunched() int {
	m.mu.Lock()
	var dead []*meshConn
	for _, list := range m.conns {
		for _, mc := range list {
			mc.mu.Lock()
			if mc.kind == PathPunched {
				dead = append(dead, mc)
			}
			mc.mu.Unlock()
		}
	}
	m.mu.Unlock()
	for _, mc := range dead {
		mc.qc.CloseWithError(errClosing, "public address changed")
	}
	return len(dead)
}

// relayPeers returns the peers with a live connection over the relay
// socket key.
func (m *Mesh) relayPeers(key string) map[string]bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := map[string]bool{}
	sock := m.relays[key]
	if sock == nil {
		return out
	}
	for peer, list := range m.conns {
		for _, mc := range list {
			if mc.sock == sock && mc.qc.Context().Err() == nil {
				out[peer] = true
			}
		}
	}
	return out
}

// directIPs returns the remote IPs of live direct and punched
// connections (not relayed ones): the peers' public addresses as this
// node sees them.
func (m *Mesh) directIPs() []netip.Addr {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []netip.Addr
	seen := map[netip.Addr]bool{}
	for _, list := range m.conns {
		for _, mc := range list {
			if mc.sock.via != "" || mc.qc.Context().Err() != nil {
				continue
			}
			mc.mu.Lock()
			relayed := mc.kind == PathRelayed
			mc.mu.Unlock()
			if relayed {
				continue
			}
			ua, ok := mc.qc.RemoteAddr().(*net.UDPAddr)
			if !ok {
				continue
			}
			a, ok := netip.AddrFromSlice(ua.IP)
			if !ok {
				continue
			}
			if a = a.Unmap(); !seen[a] {
				seen[a] = true
				out = append(out, a)
			}
		}
	}
	return out
}
