package relay

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"time"
)

// Introductions (rendezvous for hole punching). A node that two peers
// both reach directly sees each one's public address: the source address
// of its connection, i.e. the NAT mapping of that peer's mesh socket. On
// the IntroduceService stream (a mesh service every Mesh serves) a node A
// asks such a node R for peer B; R tells B to punch towards A's address
// and answers A with B's, and both Punch at once.
//
// Wire format: one JSON object each way on an IntroduceService stream.
//
//	A -> R: {"v":1,"op":"introduce","peer":"B"}
//	R -> B: {"v":1,"op":"punch","peer":"A","addr":"<A's address at R>"}
//	reply:  {"v":1,"addr":"<B's address at R>"} (to introduce), {"v":1} (to
//	        punch), or {"v":1,"error":"..."}
const IntroduceService = "circle-introduce"

const maxIntroduceMsg = 4 << 10

type introMsg struct {
	V     int    `json:"v"`
	Op    string `json:"op,omitempty"`
	Peer  string `json:"peer,omitempty"`
	Addr  string `json:"addr,omitempty"`
	Error string `json:"error,omitempty"`
}

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
	res, err := exchange(c, introMsg{V: meshVersion, Op: "introduce", Peer: peer}, m.cfg.HandshakeTimeout)
	if err != nil {
		return fmt.Errorf("relay: introduction to %s by %s: %w", peer, introducer, err)
	}
	addr, err := net.ResolveUDPAddr("udp", res.Addr)
	if err != nil {
		return fmt.Errorf("relay: introduction to %s by %s: bad address %q", peer, introducer, res.Addr)
	}
	return m.Punch(ctx, peer, addr)
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
	var req introMsg
	if err := json.NewDecoder(io.LimitReader(c, maxIntroduceMsg)).Decode(&req); err != nil {
		return
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
			reply(introMsg{Error: fmt.Sprintf("%s has no direct paths to both %s and %s", m.cfg.Name, from, req.Peer)})
			return
		}
		ctx, cancel := context.WithTimeout(m.ctx, m.cfg.HandshakeTimeout)
		defer cancel()
		pc, err := m.Dial(ctx, req.Peer, IntroduceService)
		if err != nil {
			reply(introMsg{Error: err.Error()})
			return
		}
		_, err = exchange(pc, introMsg{V: meshVersion, Op: "punch", Peer: from, Addr: fromAddr.String()}, m.cfg.HandshakeTimeout)
		pc.Close()
		if err != nil {
			reply(introMsg{Error: err.Error()})
			return
		}
		reply(introMsg{Addr: peerAddr.String()})
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
	default:
		reply(introMsg{Error: "unknown op " + req.Op})
	}
}
