package caddymodule

import (
	"context"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/homecircle/circle/identity"
	"github.com/homecircle/circle/relay"
	"github.com/homecircle/circle/replicator"
)

// nodes holds this process's circle node(s), keyed by poolKey. In practice
// there is one: the `circle` app acquires it in Provision, and a config
// reload acquires the same key before the old config releases it, so the
// node (its bbolt file, gossip sockets and identity service) survives reloads.
var nodes = caddy.NewUsagePool()

// storageKeyInfo is the HKDF label of the at-rest key for certificate keys.
const storageKeyInfo = "circle storage keys v1"

// poolKey identifies a node by what makes it a distinct node: its name and
// its data directory (one bbolt file can only be opened once).
func poolKey(name, dataDir string) string {
	return "circle-node|" + name + "|" + dataDir
}

// nodeConfig is what the app hands to acquireNode.
type nodeConfig struct {
	replicator  replicator.Config
	identity    identity.Config
	syncTimeout time.Duration
	logger      *zap.Logger

	// listen is the UDP address of the mesh socket (the replicator's
	// BindAddr is only informative once the mesh carries memberlist).
	listen string
	// advertise is the configured advertise address ("" = derived from
	// listen or the machine's outbound address, see meshAdvertise).
	advertise string
	// relay is the TURN/STUN bind address ([host]:port), "" when this
	// node is not a relay.
	relay string
	// slog is the base structured logger (Caddy's zap logger as slog) for
	// the mesh, the path manager and the TURN server.
	slog *slog.Logger
}

// fingerprint digests the settings that need a new node to change, so a
// reload with different settings can say that they are not applied. It
// never leaves the process.
func (c nodeConfig) fingerprint() [32]byte {
	h := sha256.New()
	w := func(s string) {
		var n [8]byte
		binary.BigEndian.PutUint64(n[:], uint64(len(s)))
		h.Write(n[:])
		io.WriteString(h, s)
	}
	r := c.replicator
	w(r.Name)
	w(r.DataDir)
	w(string(r.Secret))
	w(r.BindAddr)
	w(r.AdvertiseAddr)
	for _, j := range r.Join {
		w(j)
	}
	w(fmt.Sprint(r.Replicas, r.AckTimeout, r.AntiEntropyInterval, r.FirstWriterWins))
	w(c.identity.Domain)
	w(c.listen)
	w(c.advertise)
	w(c.relay)
	var out [32]byte
	copy(out[:], h.Sum(nil))
	return out
}

// sharedNode is this process's mesh (one UDP socket carrying memberlist,
// replication and circle services), its path manager and TURN server, one
// replicator node and the identity service on top of it. It is created by
// acquireNode and closed by the pool when the last config that uses it is
// cleaned up.
type sharedNode struct {
	name        string
	mesh        *relay.Mesh
	manager     *relay.Manager
	turn        *relay.Server  // nil unless this node is a relay
	turnAddr    string         // the TURN address peers learn ("" if none)
	pendingTURN net.PacketConn // the TURN socket between openMesh and startRelay
	services    *serviceRegistry
	lastPeer    sync.Map       // service name -> the peer that took its last stream
	bg          sync.WaitGroup // background seed connections
	repl        *replicator.Node
	ident       *identity.Service
	storageKey  []byte // AES-256 key for certificate private keys at rest
	fingerprint [32]byte
	ctx         context.Context    // cancelled by Destruct
	cancel      context.CancelFunc // ends the initial sync wait, identity start and proxied service streams
}

// Destruct closes, in order: the services (their mesh handlers and live
// streams), the path manager (its allocations), the identity service, the
// replicator (it leaves the circle over the mesh, then shuts down the mesh
// transport), the TURN server and finally the mesh and its socket. It
// tolerates a partially opened node.
func (s *sharedNode) Destruct() error {
	s.cancel()
	s.bg.Wait()
	var errs []error
	if s.services != nil {
		s.services.close()
	}
	if s.manager != nil {
		if err := s.manager.Close(); err != nil {
			errs = append(errs, fmt.Errorf("closing path manager: %w", err))
		}
	}
	if s.ident != nil {
		if err := s.ident.Close(); err != nil {
			errs = append(errs, fmt.Errorf("closing identity service: %w", err))
		}
	}
	if s.repl != nil {
		if err := s.repl.Close(); err != nil && !errors.Is(err, replicator.ErrClosed) {
			errs = append(errs, fmt.Errorf("closing replicator: %w", err))
		}
	}
	if s.turn != nil {
		if err := s.turn.Close(); err != nil {
			errs = append(errs, fmt.Errorf("closing relay server: %w", err))
		}
	}
	if s.pendingTURN != nil {
		s.pendingTURN.Close()
	}
	if s.mesh != nil {
		if err := s.mesh.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, fmt.Errorf("closing mesh: %w", err))
		}
	}
	return errors.Join(errs...)
}

// acquireNode returns the node for key, opening it on first use. Every
// successful call must be paired with nodes.Delete(key).
func acquireNode(key string, cfg nodeConfig) (*sharedNode, error) {
	val, loaded, err := nodes.LoadOrNew(key, func() (caddy.Destructor, error) {
		return openSharedNode(cfg)
	})
	if err != nil {
		return nil, err
	}
	sn := val.(*sharedNode)
	if loaded && sn.fingerprint != cfg.fingerprint() {
		cfg.logger.Warn("circle node settings changed; they apply after a restart of the process, the running node is kept",
			zap.String("name", cfg.replicator.Name))
	}
	return sn, nil
}

// openSharedNode opens the mesh on the listen socket (and the TURN
// server, for a relay), the replicator over the mesh, the path manager,
// waits (bounded) for a first exchange of state with a peer, then starts
// the identity service.
func openSharedNode(cfg nodeConfig) (*sharedNode, error) {
	key, err := hkdf.Key(sha256.New, cfg.replicator.Secret, nil, storageKeyInfo, 32)
	if err != nil {
		return nil, fmt.Errorf("deriving storage key: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	sn := &sharedNode{name: cfg.replicator.Name, storageKey: key, fingerprint: cfg.fingerprint(), ctx: ctx, cancel: cancel}
	if err := sn.openMesh(cfg); err != nil {
		sn.Destruct()
		return nil, err
	}
	rc := cfg.replicator
	start := time.Now()
	rc.Join = sn.preconnect(rc.Join, seedBudget)
	tr, err := sn.mesh.Transport()
	if err != nil {
		sn.Destruct()
		return nil, fmt.Errorf("mesh transport: %w", err)
	}
	rc.Transport = tr
	repl, err := replicator.Open(rc)
	if err != nil {
		tr.Shutdown()
		sn.Destruct()
		return nil, fmt.Errorf("opening replicator: %w", err)
	}
	sn.repl = repl
	if err := sn.startRelay(cfg); err != nil {
		sn.Destruct()
		return nil, err
	}

	waitInitialSync(ctx, repl, len(cfg.replicator.Join) > 0, start, cfg.syncTimeout, cfg.logger)

	ident, err := identity.New(identityStore{repl}, cfg.identity)
	if err != nil {
		sn.Destruct()
		return nil, fmt.Errorf("creating identity service: %w", err)
	}
	sn.ident = ident
	startCtx, cancelStart := context.WithTimeout(ctx, identityStartTimeout)
	err = ident.Start(startCtx)
	cancelStart()
	if err != nil {
		sn.Destruct()
		return nil, fmt.Errorf("starting identity service: %w", err)
	}
	cfg.logger.Info("circle node opened",
		zap.String("name", cfg.replicator.Name),
		zap.String("data_dir", cfg.replicator.DataDir),
		zap.String("listen", cfg.listen),
		zap.String("advertise", sn.mesh.Addr().String()),
		zap.String("relay", sn.turnAddr))
	return sn, nil
}

// identityStartTimeout bounds the identity service's start (loading its
// state and, on a new circle, writing the first signing key).
const identityStartTimeout = 30 * time.Second

// joinGrace is how long a joining node waits for any peer to answer before
// it starts alone (the first node of a circle, or every seed down).
const joinGrace = 3 * time.Second

// waitInitialSync blocks until the node has exchanged state with a peer, no
// peer answered within joinGrace, or timeout passed. Without it a node that
// starts next to a running circle would not yet see the shared CA and would
// create a second root. It polls; the replicator joins in the background.
func waitInitialSync(ctx context.Context, n *replicator.Node, joining bool, start time.Time, timeout time.Duration, log *zap.Logger) {
	if !joining || timeout <= 0 {
		return
	}
	deadline := start.Add(timeout)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		peers := alivePeers(n)
		if peers > 0 && synced(n, start) {
			log.Info("synced with the circle", zap.Int("alive_peers", peers), zap.Duration("took", time.Since(start)))
			return
		}
		now := time.Now()
		if peers == 0 && now.Sub(start) > min(joinGrace, timeout) {
			log.Info("no peer reachable yet; starting alone, joining in the background")
			return
		}
		if now.After(deadline) {
			log.Warn("no complete exchange of state with a peer yet; continuing", zap.Int("alive_peers", peers),
				zap.Duration("waited", timeout))
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// alivePeers counts the alive members other than n itself.
func alivePeers(n *replicator.Node) int {
	c := 0
	for _, m := range n.Members() {
		if m.Name != n.Name() && m.State == replicator.StateAlive {
			c++
		}
	}
	return c
}

// synced reports whether n completed an anti-entropy exchange since t.
func synced(n *replicator.Node, t time.Time) bool {
	return n.Stats().LastAntiEntropy.After(t)
}

// identityStore adapts *replicator.Node to identity.Store.
type identityStore struct {
	n *replicator.Node
}

// mapErr turns replicator.ErrNotFound into identity.ErrNotFound.
func mapErr(err error) error {
	if errors.Is(err, replicator.ErrNotFound) {
		return fmt.Errorf("%w: %w", identity.ErrNotFound, err)
	}
	return err
}

// Get implements identity.Store.
func (s identityStore) Get(bucket, key string) ([]byte, error) {
	r, err := s.n.Get(bucket, key)
	if err != nil {
		return nil, mapErr(err)
	}
	return r.Value, nil
}

// List implements identity.Store.
func (s identityStore) List(bucket, prefix string) ([]identity.Entry, error) {
	recs, err := s.n.List(bucket, prefix)
	if err != nil {
		return nil, mapErr(err)
	}
	out := make([]identity.Entry, 0, len(recs))
	for _, r := range recs {
		out = append(out, identity.Entry{Key: r.Key, Value: r.Value})
	}
	return out, nil
}

// Put implements identity.Store.
func (s identityStore) Put(ctx context.Context, bucket, key string, value []byte) error {
	return mapErr(s.n.Put(ctx, bucket, key, value))
}

// Delete implements identity.Store.
func (s identityStore) Delete(ctx context.Context, bucket, key string) error {
	return mapErr(s.n.Delete(ctx, bucket, key))
}

// PutAsync implements identity.Store.
func (s identityStore) PutAsync(bucket, key string, value []byte) error {
	return mapErr(s.n.PutAsync(bucket, key, value))
}

// Watch implements identity.Store.
func (s identityStore) Watch(bucket string, fn func(key string, value []byte, deleted bool)) (cancel func()) {
	return s.n.Watch(bucket, func(r replicator.Record) {
		fn(r.Key, r.Value, r.Deleted)
	})
}

// Interface guards
var (
	_ identity.Store   = identityStore{}
	_ caddy.Destructor = (*sharedNode)(nil)
)
