package main

// The node assembly, following caddymodule/node.go and mesh.go (openSharedNode,
// openMesh, preconnect, startRelay without TURN, waitInitialSync,
// identityStore). Keep it in step with them until issue 8 part 3 moves that
// assembly into a Caddy-free package this binary can import.

import (
	"context"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/argon2"

	"github.com/homecircle/circle/identity"
	"github.com/homecircle/circle/relay"
	"github.com/homecircle/circle/replicator"
)

type nodeConfig struct {
	replicator  replicator.Config
	identity    identity.Config
	listen      string
	advertise   string
	syncTimeout time.Duration
	log         *slog.Logger
}

type node struct {
	name    string
	mesh    *relay.Mesh
	manager *relay.Manager
	repl    *replicator.Node
	ident   *identity.Service
	bg      sync.WaitGroup
	ctx     context.Context
	cancel  context.CancelFunc
}

// Constants as in caddymodule.
const (
	seedBudget           = 2 * time.Second
	joinGrace            = 3 * time.Second
	identityStartTimeout = 30 * time.Second
)

func openNode(cfg nodeConfig) (*node, error) {
	ctx, cancel := context.WithCancel(context.Background())
	n := &node{name: cfg.replicator.Name, ctx: ctx, cancel: cancel}
	conn, err := net.ListenPacket("udp", cfg.listen)
	if err != nil {
		n.close()
		return nil, fmt.Errorf("listening on %s: %w", cfg.listen, err)
	}
	adv, err := advertiseAddr(cfg.advertise, cfg.listen, conn.LocalAddr())
	if err != nil {
		conn.Close()
		n.close()
		return nil, err
	}
	mesh, err := relay.NewMesh(relay.MeshConfig{
		Name:          cfg.replicator.Name,
		Secret:        cfg.replicator.Secret,
		Conn:          conn,
		AdvertiseAddr: adv.String(),
		Logger:        cfg.log.With("component", "mesh"),
	})
	if err != nil {
		conn.Close()
		n.close()
		return nil, fmt.Errorf("starting mesh: %w", err)
	}
	n.mesh = mesh
	rc := cfg.replicator
	start := time.Now()
	rc.Join = n.preconnect(rc.Join)
	tr, err := mesh.Transport()
	if err != nil {
		n.close()
		return nil, fmt.Errorf("mesh transport: %w", err)
	}
	rc.Transport = tr
	repl, err := replicator.Open(rc)
	if err != nil {
		tr.Shutdown()
		n.close()
		return nil, fmt.Errorf("opening replicator: %w", err)
	}
	n.repl = repl
	mgr, err := relay.NewManager(relay.ManagerConfig{
		Mesh:    mesh,
		Secret:  rc.Secret,
		Members: n.meshMembers,
		Logger:  cfg.log.With("component", "paths"),
	})
	if err != nil {
		n.close()
		return nil, fmt.Errorf("starting path manager: %w", err)
	}
	n.manager = mgr

	n.waitInitialSync(len(cfg.replicator.Join) > 0, start, cfg.syncTimeout, cfg.log)

	ident, err := identity.New(identityStore{repl}, cfg.identity)
	if err != nil {
		n.close()
		return nil, fmt.Errorf("creating identity service: %w", err)
	}
	n.ident = ident
	sctx, scancel := context.WithTimeout(ctx, identityStartTimeout)
	err = ident.Start(sctx)
	scancel()
	if err != nil {
		n.close()
		return nil, fmt.Errorf("starting identity service: %w", err)
	}
	return n, nil
}

func (n *node) close() {
	n.cancel()
	n.bg.Wait()
	if n.manager != nil {
		n.manager.Close()
	}
	if n.ident != nil {
		n.ident.Close()
	}
	if n.repl != nil {
		n.repl.Close()
	}
	if n.mesh != nil {
		n.mesh.Close()
	}
}

// preconnect dials every seed over the mesh at once, waits up to
// seedBudget for the first to answer and puts the seeds that answered
// first (caddymodule's preconnect).
func (n *node) preconnect(seeds []string) []string {
	if len(seeds) == 0 {
		return seeds
	}
	type result struct {
		seed string
		ok   bool
	}
	ch := make(chan result, len(seeds))
	ctx, cancel := context.WithTimeout(n.ctx, relay.DefaultHandshakeTimeout)
	var wg sync.WaitGroup
	for _, seed := range seeds {
		wg.Add(1)
		go func() {
			defer wg.Done()
			addr, err := net.ResolveUDPAddr("udp", seed)
			if err == nil {
				err = n.mesh.Connect(ctx, "", addr)
			}
			ch <- result{seed, err == nil}
		}()
	}
	n.bg.Add(1)
	go func() {
		defer n.bg.Done()
		wg.Wait()
		cancel()
	}()
	timer := time.NewTimer(seedBudget)
	defer timer.Stop()
	var first []string
	answered := map[string]bool{}
wait:
	for range seeds {
		select {
		case r := <-ch:
			if r.ok {
				first = append(first, r.seed)
				answered[r.seed] = true
				break wait
			}
		case <-timer.C:
			break wait
		}
	}
	for _, s := range seeds {
		if !answered[s] {
			first = append(first, s)
		}
	}
	return first
}

func (n *node) meshMembers() []relay.Member {
	if n.repl == nil {
		return nil
	}
	var out []relay.Member
	for _, m := range n.repl.Members() {
		if m.Name == n.name || (m.State != "alive" && m.State != "suspect") {
			continue
		}
		out = append(out, relay.Member{Name: m.Name, Addr: m.Addr})
	}
	return out
}

// waitInitialSync is caddymodule's: wait until a state exchange with a peer
// completed, or no peer answered within joinGrace, or timeout.
func (n *node) waitInitialSync(joining bool, start time.Time, timeout time.Duration, log *slog.Logger) {
	if !joining || timeout <= 0 {
		return
	}
	deadline := start.Add(timeout)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		peers := 0
		for _, m := range n.repl.Members() {
			if m.Name != n.name && m.State == "alive" {
				peers++
			}
		}
		if peers > 0 && n.repl.Stats().LastAntiEntropy.After(start) {
			log.Info("synced with the circle", "alive_peers", peers, "took", time.Since(start))
			return
		}
		now := time.Now()
		if peers == 0 && now.Sub(start) > min(joinGrace, timeout) {
			log.Info("no peer reachable yet; starting alone, joining in the background")
			return
		}
		if now.After(deadline) {
			log.Warn("no complete exchange of state with a peer yet; continuing", "alive_peers", peers)
			return
		}
		select {
		case <-n.ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// advertiseAddr is caddymodule's meshAdvertise: advertise if set, else the
// listen host if specific, else the first non-loopback IPv4 address.
func advertiseAddr(advertise, listen string, bound net.Addr) (*net.UDPAddr, error) {
	port := bound.(*net.UDPAddr).Port
	if advertise != "" {
		ua, err := net.ResolveUDPAddr("udp", advertise)
		if err != nil {
			return nil, fmt.Errorf("advertise address %q: %w", advertise, err)
		}
		return ua, nil
	}
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		return nil, err
	}
	if ip := net.ParseIP(host); ip != nil && !ip.IsUnspecified() {
		return &net.UDPAddr{IP: ip, Port: port}, nil
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, err
	}
	for _, a := range addrs {
		if ipn, ok := a.(*net.IPNet); ok && ipn.IP.To4() != nil && ipn.IP.IsGlobalUnicast() {
			return &net.UDPAddr{IP: ipn.IP.To4(), Port: port}, nil
		}
	}
	return nil, errors.New("no IPv4 address to advertise")
}

// identityStore adapts *replicator.Node to identity.Store (caddymodule's).
type identityStore struct{ n *replicator.Node }

func mapErr(err error) error {
	if errors.Is(err, replicator.ErrNotFound) {
		return fmt.Errorf("%w: %w", identity.ErrNotFound, err)
	}
	return err
}

func (s identityStore) Get(bucket, key string) ([]byte, error) {
	r, err := s.n.Get(bucket, key)
	if err != nil {
		return nil, mapErr(err)
	}
	return r.Value, nil
}

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

func (s identityStore) Put(ctx context.Context, bucket, key string, value []byte) error {
	return mapErr(s.n.Put(ctx, bucket, key, value))
}

func (s identityStore) Delete(ctx context.Context, bucket, key string) error {
	return mapErr(s.n.Delete(ctx, bucket, key))
}

func (s identityStore) PutAsync(bucket, key string, value []byte) error {
	return mapErr(s.n.PutAsync(bucket, key, value))
}

func (s identityStore) Watch(bucket string, fn func(key string, value []byte, deleted bool)) (cancel func()) {
	return s.n.Watch(bucket, func(r replicator.Record) { fn(r.Key, r.Value, r.Deleted) })
}

// verifyPHC checks pw against an argon2id PHC string
// ($argon2id$v=19$m=<KiB>,t=<n>,p=<n>$<salt>$<hash>).
func verifyPHC(pw, phc string) (bool, error) {
	f := strings.Split(phc, "$")
	if len(f) != 6 || f[1] != "argon2id" {
		return false, errors.New("not an argon2id PHC string")
	}
	var m, t, p uint64
	for _, kv := range strings.Split(f[3], ",") {
		k, v, _ := strings.Cut(kv, "=")
		x, err := strconv.ParseUint(v, 10, 32)
		if err != nil {
			return false, err
		}
		switch k {
		case "m":
			m = x
		case "t":
			t = x
		case "p":
			p = x
		}
	}
	salt, err := base64.RawStdEncoding.DecodeString(f[4])
	if err != nil {
		return false, err
	}
	want, err := base64.RawStdEncoding.DecodeString(f[5])
	if err != nil {
		return false, err
	}
	if m == 0 || t == 0 || p == 0 || p > 255 || m > 1<<20 {
		return false, errors.New("bad argon2 parameters")
	}
	got := argon2.IDKey([]byte(pw), salt, uint32(t), uint32(m), uint8(p), uint32(len(want)))
	return subtle.ConstantTimeCompare(got, want) == 1, nil
}
