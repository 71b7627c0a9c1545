package relay_test

import (
	"bytes"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/homecircle/circle/relay"
	"github.com/pion/stun"
)

// turnFaults wraps a TURN server's socket to reproduce the pion v2
// pitfalls of DESIGN.md section 5 within a test's time: allocations live
// 2 s (so pion refreshes every second), every ChannelBind is answered 438
// Stale Nonce (pion never retries it, so all relayed traffic stays on Send
// indications), and on demand the next Refresh is answered 438 with a new,
// valid nonce (what happens after the server's hour-long nonce lifetime).
type turnFaults struct {
	net.PacketConn
	staleNext atomic.Bool

	mu    sync.Mutex // guards nonce
	nonce string     // a valid nonce the server handed out

	refreshes, staleSent, freshUsed, binds, sends atomic.Int32
}

func (f *turnFaults) ReadFrom(b []byte) (int, net.Addr, error) {
	for {
		n, addr, err := f.PacketConn.ReadFrom(b)
		if err != nil || !stun.IsMessage(b[:n]) {
			return n, addr, err
		}
		m := &stun.Message{Raw: append([]byte(nil), b[:n]...)}
		if m.Decode() != nil {
			return n, addr, err
		}
		switch m.Type {
		case stun.NewType(stun.MethodChannelBind, stun.ClassRequest):
			f.binds.Add(1)
			f.answerStale(m, addr)
			continue
		case stun.NewType(stun.MethodRefresh, stun.ClassRequest):
			if f.staleNext.CompareAndSwap(true, false) {
				f.staleSent.Add(1)
				f.answerStale(m, addr)
				continue
			}
			var nonce stun.Nonce
			f.mu.Lock()
			fresh := f.nonce
			f.mu.Unlock()
			if nonce.GetFrom(m) == nil && f.staleSent.Load() > 0 && nonce.String() == fresh {
				f.freshUsed.Add(1)
			}
		case stun.NewType(stun.MethodSend, stun.ClassIndication):
			f.sends.Add(1)
		}
		return n, addr, nil
	}
}

func (f *turnFaults) answerStale(req *stun.Message, to net.Addr) {
	f.mu.Lock()
	nonce := f.nonce
	f.mu.Unlock()
	res, err := stun.Build(stun.NewTransactionIDSetter(req.TransactionID),
		stun.NewType(req.Type.Method, stun.ClassErrorResponse), stun.CodeStaleNonce,
		stun.NewRealm(relay.DefaultRealm), stun.NewNonce(nonce), stun.Fingerprint)
	if err == nil {
		f.PacketConn.WriteTo(res.Raw, to)
	}
}

func (f *turnFaults) WriteTo(b []byte, addr net.Addr) (int, error) {
	m := &stun.Message{Raw: append([]byte(nil), b...)}
	if stun.IsMessage(b) && m.Decode() == nil {
		switch m.Type {
		case stun.NewType(stun.MethodAllocate, stun.ClassSuccessResponse):
			setLifetime(m.Raw, 2)
			b = m.Raw
		case stun.NewType(stun.MethodRefresh, stun.ClassSuccessResponse):
			f.refreshes.Add(1)
		}
		// Keep the newest nonce the server issued (401s carry one).
		var nonce stun.Nonce
		if m.Type.Class == stun.ClassErrorResponse && nonce.GetFrom(m) == nil {
			f.mu.Lock()
			f.nonce = nonce.String()
			f.mu.Unlock()
		}
	}
	return f.PacketConn.WriteTo(b, addr)
}

// newNonce makes the server issue a fresh nonce (an unauthenticated
// Allocate is answered 401 with one), which the shim then keeps.
func newNonce(t *testing.T, f *turnFaults, server string) string {
	t.Helper()
	f.mu.Lock()
	old := f.nonce
	f.mu.Unlock()
	c := listenUDP(t)
	defer c.Close()
	req, err := stun.Build(stun.TransactionID, stun.NewType(stun.MethodAllocate, stun.ClassRequest),
		stun.RawAttribute{Type: stun.AttrRequestedTransport, Value: []byte{17, 0, 0, 0}}, stun.Fingerprint)
	if err != nil {
		t.Fatal(err)
	}
	raddr, _ := net.ResolveUDPAddr("udp", server)
	var fresh string
	eventually(t, 5*time.Second, "a fresh nonce", func() bool {
		c.WriteTo(req.Raw, raddr)
		c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		c.ReadFrom(make([]byte, 1500))
		f.mu.Lock()
		defer f.mu.Unlock()
		fresh = f.nonce
		return fresh != "" && fresh != old
	})
	return fresh
}

// TestMeshOverTURNStaleNonceAndSendIndications: a QUIC path through a
// relay whose channel binds fail (Send indications only) keeps working
// across allocation refreshes and a stale-nonce answer to one of them.
func TestMeshOverTURNStaleNonceAndSendIndications(t *testing.T) {
	var faults *turnFaults
	env, _, carol := meshViaTURN(t, "carol", func(pc net.PacketConn) net.PacketConn {
		faults = &turnFaults{PacketConn: pc}
		return faults
	})
	alice := newMesh(t, "alice", testSecret)
	serveEcho(t, alice, "echo")
	if err := carol.Connect(ctxT(t, 5*time.Second), "alice", alice.Addr()); err != nil {
		t.Fatal(err)
	}
	big := bytes.Repeat([]byte("indication "), 30000)
	echoOnce(t, carol, "alice", "echo", big)
	if faults.binds.Load() == 0 || faults.sends.Load() == 0 {
		t.Fatalf("binds %d, send indications %d: the channel bind failure was not exercised",
			faults.binds.Load(), faults.sends.Load())
	}

	newNonce(t, faults, env.addr)
	r0 := faults.refreshes.Load()
	faults.staleNext.Store(true)
	eventually(t, 10*time.Second, "refreshes with the new nonce after a 438", func() bool {
		return faults.staleSent.Load() == 1 && faults.freshUsed.Load() >= 2 && faults.refreshes.Load() >= r0+2
	})
	echoOnce(t, carol, "alice", "echo", big)
	if p := carol.Paths(); len(p) != 1 || p[0].Kind != relay.PathRelayed {
		t.Fatalf("paths %+v", p)
	}
}
