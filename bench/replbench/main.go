// Command replbench measures how long an acknowledged write takes to be
// visible on every node of a circle: it starts 3 and then 5 replicator
// nodes on loopback (real memberlist over real sockets, bbolt in a temp
// dir), writes records with acknowledgement on one node and records, for
// each write, the time until Put returned (ack) and until the last node's
// Watch saw it (all). It prints p50/p99 for both, side by side.
//
//	go run ./bench/replbench [-writes 300]
package main

import (
	"context"
	"crypto/rand"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"sort"
	"sync"
	"time"

	"github.com/homecircle/circle/bench/internal/ports"
	"github.com/homecircle/circle/replicator"
)

func main() {
	writes := flag.Int("writes", 300, "acknowledged writes per circle size")
	flag.Parse()
	fmt.Printf("%-6s %-6s %10s %10s %10s %10s\n", "nodes", "writes", "ack p50", "ack p99", "all p50", "all p99")
	for _, size := range []int{3, 5} {
		ack, all, err := measure(size, *writes)
		if err != nil {
			fmt.Fprintln(os.Stderr, "replbench:", err)
			os.Exit(1)
		}
		fmt.Printf("%-6d %-6d %10v %10v %10v %10v\n", size, *writes,
			pct(ack, 50), pct(ack, 99), pct(all, 50), pct(all, 99))
	}
}

func pct(d []time.Duration, p int) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := (len(s)*p + 99) / 100
	if i > 0 {
		i--
	}
	return s[i].Round(10 * time.Microsecond)
}

func measure(size, writes int) (ack, all []time.Duration, err error) {
	secret := make([]byte, 32)
	rand.Read(secret)
	dir, err := os.MkdirTemp("", "replbench-")
	if err != nil {
		return nil, nil, err
	}
	defer os.RemoveAll(dir)

	var nodes []*replicator.Node
	defer func() {
		for _, n := range nodes {
			n.Close()
		}
	}()
	var seeds []string
	for i := 0; i < size; i++ {
		port, err := ports.Free()
		if err != nil {
			return nil, nil, err
		}
		cfg := replicator.DefaultConfig()
		cfg.Name = fmt.Sprintf("n%d", i)
		cfg.DataDir = fmt.Sprintf("%s/n%d", dir, i)
		cfg.Secret = secret
		cfg.BindAddr = fmt.Sprintf("127.0.0.1:%d", port)
		cfg.Join = append([]string(nil), seeds...)
		cfg.Replicas = 2
		cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))
		n, err := replicator.Open(cfg)
		if err != nil {
			return nil, nil, fmt.Errorf("opening node %d: %w", i, err)
		}
		nodes = append(nodes, n)
		seeds = append(seeds, cfg.BindAddr)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		ok := true
		for _, n := range nodes {
			alive := 0
			for _, m := range n.Members() {
				if m.State == replicator.StateAlive {
					alive++
				}
			}
			ok = ok && alive == size
		}
		if ok {
			break
		}
		if time.Now().After(deadline) {
			return nil, nil, fmt.Errorf("%d nodes did not converge on membership", size)
		}
		time.Sleep(50 * time.Millisecond)
	}

	// seen[key] counts the nodes (other than the writer) whose Watch saw it;
	// done[key] is closed when all of them have.
	var mu sync.Mutex // guards seen, done, lastSeen
	seen := map[string]int{}
	done := map[string]chan struct{}{}
	lastSeen := map[string]time.Time{}
	for _, n := range nodes[1:] {
		cancel := n.Watch("bench", func(r replicator.Record) {
			now := time.Now()
			mu.Lock()
			defer mu.Unlock()
			seen[r.Key]++
			if seen[r.Key] == size-1 {
				lastSeen[r.Key] = now
				if ch, ok := done[r.Key]; ok {
					close(ch)
				}
			}
		})
		defer cancel()
	}
	value := make([]byte, 200)
	for i := 0; i < writes; i++ {
		key := fmt.Sprintf("k%06d", i)
		ch := make(chan struct{})
		mu.Lock()
		done[key] = ch
		mu.Unlock()
		start := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := nodes[0].Put(ctx, "bench", key, value)
		cancel()
		if err != nil {
			return nil, nil, fmt.Errorf("put %s: %w", key, err)
		}
		ack = append(ack, time.Since(start))
		select {
		case <-ch:
		case <-time.After(10 * time.Second):
			return nil, nil, fmt.Errorf("write %s not visible on all %d nodes within 10s", key, size)
		}
		mu.Lock()
		all = append(all, lastSeen[key].Sub(start))
		mu.Unlock()
	}
	return ack, all, nil
}
