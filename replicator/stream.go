package replicator

import (
	"bufio"
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

const (
	handshakeTimeout = 5 * time.Second
	ioTimeout        = 10 * time.Second // per message on replication streams
	idleTimeout      = 90 * time.Second // a listener closes a stream idle this long
	maxFrame         = 16 << 20         // largest frame plaintext accepted
)

// muxTransport wraps memberlist's transport so that replication streams
// share it: inbound streams starting with streamMagic go to handle, every
// other stream goes on to memberlist. It also makes dials abortable on
// shutdown for the default TCP transport.
type muxTransport struct {
	memberlist.NodeAwareTransport
	handle  func(net.Conn) // serves a replication stream; runs on its own goroutine
	ownsTCP bool           // inner is our NetTransport: dial with stopCtx
	out     chan net.Conn  // streams for memberlist
	stopCtx context.Context
	stop    context.CancelFunc
	wg      sync.WaitGroup // accept loop and per-stream goroutines

	mu    sync.Mutex // guards conns
	conns map[net.Conn]struct{}
}

func newMux(inner memberlist.NodeAwareTransport, ownsTCP bool, handle func(net.Conn)) *muxTransport {
	ctx, cancel := context.WithCancel(context.Background())
	m := &muxTransport{
		NodeAwareTransport: inner,
		handle:             handle,
		ownsTCP:            ownsTCP,
		out:                make(chan net.Conn),
		stopCtx:            ctx,
		stop:               cancel,
		conns:              make(map[net.Conn]struct{}),
	}
	m.wg.Add(1)
	go m.acceptLoop()
	return m
}

// StreamCh implements memberlist.Transport: the streams that are not ours.
func (m *muxTransport) StreamCh() <-chan net.Conn { return m.out }

// DialTimeout implements memberlist.Transport.
func (m *muxTransport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	return m.DialAddressTimeout(memberlist.Address{Addr: addr}, timeout)
}

// DialAddressTimeout implements memberlist.NodeAwareTransport.
func (m *muxTransport) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	if !m.ownsTCP {
		return m.NodeAwareTransport.DialAddressTimeout(a, timeout)
	}
	d := net.Dialer{Timeout: timeout}
	return d.DialContext(m.stopCtx, "tcp", a.Addr)
}

// Shutdown implements memberlist.Transport: it shuts the inner transport
// down, closes every replication stream and waits for their goroutines.
func (m *muxTransport) Shutdown() error {
	err := m.NodeAwareTransport.Shutdown()
	m.stop()
	m.mu.Lock()
	for c := range m.conns {
		c.Close()
	}
	m.mu.Unlock()
	m.wg.Wait()
	return err
}

// track registers c so that Shutdown closes it; false if shut down.
func (m *muxTransport) track(c net.Conn) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.stopCtx.Err() != nil {
		return false
	}
	m.conns[c] = struct{}{}
	return true
}

func (m *muxTransport) untrack(c net.Conn) {
	m.mu.Lock()
	delete(m.conns, c)
	m.mu.Unlock()
}

func (m *muxTransport) acceptLoop() {
	defer m.wg.Done()
	in := m.NodeAwareTransport.StreamCh()
	for {
		select {
		case c := <-in:
			if !m.track(c) {
				c.Close()
				continue
			}
			m.wg.Add(1)
			go m.classify(c)
		case <-m.stopCtx.Done():
			return
		}
	}
}

// classify reads the first byte of an inbound stream and routes it.
func (m *muxTransport) classify(c net.Conn) {
	defer m.wg.Done()
	var first [1]byte
	c.SetReadDeadline(time.Now().Add(handshakeTimeout))
	if _, err := io.ReadFull(c, first[:]); err != nil {
		m.untrack(c)
		c.Close()
		return
	}
	c.SetReadDeadline(time.Time{})
	if first[0] == streamMagic {
		defer m.untrack(c)
		defer c.Close()
		m.handle(c)
		return
	}
	m.untrack(c) // memberlist owns it from here
	select {
	case m.out <- &peekedConn{Conn: c, first: first[0], has: true}:
	case <-m.stopCtx.Done():
		c.Close()
	}
}

// peekedConn replays one byte already read from Conn.
type peekedConn struct {
	net.Conn
	first byte
	has   bool
}

func (p *peekedConn) Read(b []byte) (int, error) {
	if p.has && len(b) > 0 {
		b[0] = p.first
		p.has = false
		return 1, nil
	}
	return p.Conn.Read(b)
}

// secureConn is an authenticated, encrypted replication stream (see
// wire.go). Not safe for concurrent use.
type secureConn struct {
	c        net.Conn
	r        *bufio.Reader
	w        *bufio.Writer
	seal     cipher.AEAD
	open     cipher.AEAD
	sendSeq  uint64
	recvSeq  uint64
	peer     string    // peer node name (dialer side; listener side once negotiated)
	lastUsed time.Time // when last returned to the pool
	version  byte      // wire version spoken (1 unless negotiated higher)
	wire     peerWire  // what the peer speaks (version.go)
}

// deriveStreamKey derives the replication stream key from the secret.
func deriveStreamKey(secret []byte) ([]byte, error) {
	return hkdf.Key(sha256.New, secret, nil, "circle stream v1", 32)
}

func newAEAD(streamKey, salt []byte, info string) (cipher.AEAD, error) {
	k, err := hkdf.Key(sha256.New, streamKey, salt, info, 32)
	if err != nil {
		return nil, err
	}
	b, err := aes.NewCipher(k)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(b)
}

func helloMsg(nonce []byte) []byte {
	e := newMsg(msgHello, nonceLen)
	e.b = append(e.b, nonce...)
	return e.b
}

// readHello reads the peer's hello: exactly 34 bytes, any version from 1
// up (the layout is fixed for good; see version.go).
func readHello(r io.Reader) ([]byte, error) {
	var buf [2 + nonceLen]byte
	if _, err := io.ReadFull(r, buf[:]); err != nil {
		return nil, fmt.Errorf("reading hello: %w", err)
	}
	_, typ, body, err := parseHeader(buf[:])
	if err != nil {
		return nil, err
	}
	if typ != msgHello {
		return nil, fmt.Errorf("%w: expected hello, got type %d", errMalformed, typ)
	}
	return body, nil
}

// handshake runs the hello exchange on s.c (the dialer first writes the
// magic byte), sets up the stream's ciphers and, if both hellos are
// tagged, negotiates the version and capabilities (version.go). p is what
// this node speaks and name its node name.
func (s *secureConn) handshake(streamKey []byte, p wireProfile, name string, dialer bool) error {
	c := s.c
	c.SetDeadline(time.Now().Add(handshakeTimeout))
	defer c.SetDeadline(time.Time{})
	mine := p.newNonce()
	s.r = bufio.NewReaderSize(c, 8<<10)
	s.w = bufio.NewWriterSize(c, 8<<10)
	s.version = 1
	var theirs []byte
	var err error
	if dialer {
		if _, err = s.w.Write(append([]byte{streamMagic}, helloMsg(mine)...)); err == nil {
			err = s.w.Flush()
		}
		if err != nil {
			return fmt.Errorf("sending hello: %w", err)
		}
		if theirs, err = readHello(s.r); err != nil {
			return err
		}
	} else {
		if theirs, err = readHello(s.r); err != nil {
			return err
		}
		if _, err = s.w.Write(helloMsg(mine)); err == nil {
			err = s.w.Flush()
		}
		if err != nil {
			return fmt.Errorf("sending hello: %w", err)
		}
	}
	var salt []byte // dialer nonce first
	if dialer {
		salt = append(append(salt, mine...), theirs...)
	} else {
		salt = append(append(salt, theirs...), mine...)
	}
	d, err := newAEAD(streamKey, salt, "circle stream dialer")
	if err != nil {
		return err
	}
	l, err := newAEAD(streamKey, salt, "circle stream listener")
	if err != nil {
		return err
	}
	if dialer {
		s.seal, s.open = d, l
	} else {
		s.seal, s.open = l, d
	}
	if p.legacy || !tagged(theirs) {
		if p.min > 1 {
			return fmt.Errorf("%w: the peer speaks version 1 only, we speak %d..%d", errNoCommonVersion, p.min, p.max)
		}
		s.wire = peerWire{Min: 1, Max: 1, Version: 1}
		return nil
	}
	pw, err := s.negotiate(p, name)
	if err != nil {
		return err
	}
	s.wire, s.version = pw, pw.Version
	return nil
}

func seqNonce(seq uint64) []byte {
	n := make([]byte, 12)
	binary.BigEndian.PutUint64(n, seq)
	return n
}

// send writes one message as a frame and flushes it.
func (s *secureConn) send(msg []byte) error {
	s.c.SetWriteDeadline(time.Now().Add(ioTimeout))
	ct := s.seal.Seal(nil, seqNonce(s.sendSeq), msg, nil)
	s.sendSeq++
	var l [4]byte
	binary.BigEndian.PutUint32(l[:], uint32(len(ct)))
	if _, err := s.w.Write(l[:]); err != nil {
		return err
	}
	if _, err := s.w.Write(ct); err != nil {
		return err
	}
	return s.w.Flush()
}

// errAuth means a frame failed authentication (another secret, or tampering).
var errAuth = errors.New("stream authentication failed")

// recv reads one frame within timeout and returns the message type and
// body. Any type passes (the caller decides); a version above the
// stream's is malformed, and msgUnknown is returned with an error wrapping
// errUnknownRequest (the stream stays usable).
func (s *secureConn) recv(timeout time.Duration) (byte, []byte, error) {
	s.c.SetReadDeadline(time.Now().Add(timeout))
	var l [4]byte
	if _, err := io.ReadFull(s.r, l[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(l[:])
	if n < uint32(s.open.Overhead()) || n > maxFrame+uint32(s.open.Overhead()) {
		return 0, nil, fmt.Errorf("%w: frame length %d", errMalformed, n)
	}
	// Grow with the bytes that actually arrive: an unauthenticated peer
	// must not make us allocate maxFrame by sending a length.
	var buf bytes.Buffer
	if _, err := io.CopyN(&buf, s.r, int64(n)); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, err
	}
	ct := buf.Bytes()
	pt, err := s.open.Open(ct[:0], seqNonce(s.recvSeq), ct, nil)
	if err != nil {
		return 0, nil, errAuth
	}
	s.recvSeq++
	ver, typ, body, err := parseHeader(pt)
	if err != nil {
		return 0, nil, err
	}
	if ver > max(s.version, 1) {
		return 0, nil, fmt.Errorf("%w: version %d on a stream of version %d", errMalformed, ver, max(s.version, 1))
	}
	if typ == msgUnknown {
		var t byte
		if len(body) > 0 {
			t = body[0]
		}
		return typ, body, fmt.Errorf("%w (type %d)", errUnknownRequest, t)
	}
	return typ, body, nil
}

func (s *secureConn) Close() error { return s.c.Close() }
