package relay

import (
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/pion/turn/v2"
)

// AllocateConfig configures Allocate. Zero values of optional fields mean
// the default stated on the field.
type AllocateConfig struct {
	// Conn is the local UDP socket to talk to the TURN server from
	// (required). The Allocation owns it and closes it on Close.
	Conn net.PacketConn

	// Server is the TURN server's host:port (required).
	Server string

	// Secret is the circle secret (required).
	Secret []byte

	// Node is this node's name, part of the credential username (required).
	Node string

	// TTL is how long the derived credentials are valid. The allocation
	// stops being refreshable after that, so it must be replaced before
	// (the Manager does at 3/4 of it). Default DefaultCredentialTTL.
	TTL time.Duration

	// KeepAlive is the period of STUN Binding requests to the server that
	// hold the NAT mapping between this socket and the server open even
	// when no traffic is relayed (pion only refreshes every few minutes,
	// and a home NAT forgets a UDP mapping after about 30 s; a new mapping
	// would no longer match the allocation). Default DefaultAllocationKeepAlive.
	KeepAlive time.Duration

	// Logger receives pion's logs. Default: discard.
	Logger *slog.Logger
}

// DefaultAllocationKeepAlive is the default AllocateConfig.KeepAlive.
const DefaultAllocationKeepAlive = 15 * time.Second

// Allocation is a TURN allocation on a relay: PacketConn sends and
// receives through the relay's address. pion refreshes the allocation
// (every half lifetime) and its permissions (every 2 minutes) by itself.
//
// Known pion/turn v2 client pitfalls (DESIGN.md section 5):
//   - One allocation per client: a second Allocate on the same turn.Client
//     fails, so each Allocation has its own client and socket.
//   - Failed channel binds are not retried: traffic to that peer stays on
//     Send indications (36 bytes more per packet), which still works.
//   - Stale nonce: the server's nonces expire after an hour; refreshes then
//     get 438 Stale Nonce and are retried with the new nonce (up to 3
//     times), but a lost retry leaves a long-lived relay on Send
//     indications, which broke QUIC over TURN elsewhere. The nonce lifetime
//     is a constant inside pion's server, so the tests reproduce it on the
//     wire: TestAllocationSurvivesRefresh and TestMeshOverTURNSurvivesRefresh
//     shorten the allocation lifetime to 2 s; TestMeshOverTURNStaleNonceAndSendIndications
//     answers one refresh 438 with a new nonce and every channel bind 438,
//     so QUIC runs on Send indications only, through several refreshes.
//     The NAT harness should still run a relay for over an hour.
//   - Credentials are REST-API style and expire after TTL, refreshes too.
type Allocation struct {
	client *turn.Client
	relay  net.PacketConn
	conn   net.PacketConn
	stop   chan struct{} // closed by Close
	wg     sync.WaitGroup

	once sync.Once
	err  error
}

// Allocate creates a UDP allocation on the TURN server cfg.Server with
// credentials derived from the circle secret.
func Allocate(cfg AllocateConfig) (*Allocation, error) {
	if cfg.Conn == nil || cfg.Server == "" {
		return nil, fmt.Errorf("%w: allocate: conn and server are required", ErrInvalid)
	}
	if cfg.TTL <= 0 {
		cfg.TTL = DefaultCredentialTTL
	}
	user, pass, err := Credentials(cfg.Secret, cfg.Node, time.Now().Add(cfg.TTL))
	if err != nil {
		return nil, err
	}
	c, err := turn.NewClient(&turn.ClientConfig{
		STUNServerAddr: cfg.Server,
		TURNServerAddr: cfg.Server,
		Username:       user,
		Password:       pass,
		Conn:           cfg.Conn,
		LoggerFactory:  pionLogs{orDiscard(cfg.Logger)},
	})
	if err != nil {
		return nil, fmt.Errorf("relay: turn client: %w", err)
	}
	if err := c.Listen(); err != nil {
		c.Close()
		return nil, fmt.Errorf("relay: turn client: %w", err)
	}
	rc, err := c.Allocate()
	if err != nil {
		c.Close()
		cfg.Conn.Close() // stops the client's read loop
		// pion's server answers refused credentials with 400 (bad
		// integrity) or 401; its client only reports the text.
		if msg := err.Error(); strings.Contains(msg, "error 400") || strings.Contains(msg, "error 401") {
			return nil, fmt.Errorf("%w: allocating on %s: %w", ErrAuth, cfg.Server, err)
		}
		return nil, fmt.Errorf("relay: allocating on %s: %w", cfg.Server, err)
	}
	if cfg.KeepAlive <= 0 {
		cfg.KeepAlive = DefaultAllocationKeepAlive
	}
	a := &Allocation{client: c, relay: rc, conn: cfg.Conn, stop: make(chan struct{})}
	a.wg.Add(1)
	go a.keepAlive(cfg.KeepAlive)
	return a, nil
}

// keepAlive sends a Binding request to the server every period until
// Close.
func (a *Allocation) keepAlive(period time.Duration) {
	defer a.wg.Done()
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-a.stop:
			return
		case <-t.C:
			select {
			case <-a.stop:
				return
			default:
			}
			// Blocks for at most pion's retransmissions; Close ends it
			// early (closing the client's transactions and socket).
			a.client.SendBindingRequest()
		}
	}
}

// PacketConn returns the relayed connection: its LocalAddr is the relayed
// address on the TURN server; WriteTo creates the TURN permission (and a
// channel binding) for the destination on first use.
func (a *Allocation) PacketConn() net.PacketConn { return a.relay }

// CreatePermission asks the TURN server to relay packets from (and to)
// the IPs of addrs (TURN permissions are per IP: any port of that IP gets
// through). WriteTo creates them on first use too; this is for letting a
// peer in before sending to it. A stale nonce is retried. Without an
// answer from the server it fails after pion's retransmissions (about
// 8 s), or when the Allocation is closed.
func (a *Allocation) CreatePermission(addrs ...net.Addr) error {
	var err error
	for range 3 {
		if err = a.client.CreatePermission(addrs...); err == nil {
			return nil
		}
		select {
		case <-a.stop:
			return ErrClosed
		default:
		}
		// pion's errTryAgain (unexported): a stale nonce, now replaced.
		if !strings.Contains(err.Error(), "try again") {
			break
		}
	}
	return err
}

// RelayAddr returns the relayed address peers send to.
func (a *Allocation) RelayAddr() net.Addr { return a.relay.LocalAddr() }

// Close releases the allocation (best effort), stops pion's timers and
// closes the socket. It is idempotent.
func (a *Allocation) Close() error {
	a.once.Do(func() {
		close(a.stop)
		a.err = a.relay.Close()
		a.client.Close()
		if err := a.conn.Close(); a.err == nil {
			a.err = err
		}
		a.wg.Wait()
	})
	return a.err
}
