package caddymodule

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	_ "github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/homecircle/circle/relay"
)

// TestCaddyMeshProxyAndStatus runs a relay node with Caddy in-process: a
// reverse_proxy with `transport circle` reaches a service that another
// node offers, over the mesh; /circle/status reports the mesh, the relay
// and the services; the TURN server answers STUN; with the other node
// gone, the proxy answers 502.
func TestCaddyMeshProxyAndStatus(t *testing.T) {
	secretFile, _ := writeSecretFile(t)
	t.Setenv("XDG_DATA_HOME", t.TempDir())
	t.Setenv("XDG_CONFIG_HOME", t.TempDir())
	beta := startTestNode(t, "beta", secretFile, nil, map[string]string{"photos": nameServer(t, "photos on beta")})

	admin, httpAddr, gossip, turn := freeAddr(t), freeAddr(t), freeAddr(t), freeAddr(t)
	cfg := fmt.Sprintf(`{
		"admin": {"listen": %q},
		"apps": {
			"circle": {"name": "alpha", "domain": "circle.test", "secret_file": %q, "data_dir": %q,
				"listen": %q, "join": [%q], "replicas": 1, "relay": %q,
				"services": {"wiki": %q}},
			"http": {"servers": {"s": {"listen": [%q], "automatic_https": {"disable": true},
				"routes": [{"handle": [{"handler": "reverse_proxy", "transport": {"protocol": "circle"},
					"upstreams": [{"dial": "photos:80"}]}]}]}}}
		}
	}`, admin, secretFile, t.TempDir(), gossip, beta.app.Listen, turn, nameServer(t, "wiki on alpha"), httpAddr)
	if err := caddy.Load([]byte(cfg), true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { caddy.Stop() })
	alpha := &testNode{app: activeApp.Load()}
	waitMeshPeers(t, alpha, []string{"beta"}, nil)

	get := func(u string) (int, string) {
		t.Helper()
		resp, err := (&http.Client{Timeout: 15 * time.Second}).Get(u)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get("http://" + httpAddr + "/"); code != http.StatusOK || body != "photos on beta" {
		t.Fatalf("proxied to beta's photos: %d %q", code, body)
	}

	// The status.
	code, body := get("http://" + admin + "/circle/status")
	if code != http.StatusOK {
		t.Fatalf("status: %d %s", code, body)
	}
	var st map[string]any
	if err := json.Unmarshal([]byte(body), &st); err != nil {
		t.Fatal(err)
	}
	if st["relay"] != turn || st["role"] != "member and relay" {
		t.Fatalf("relay %v role %v, want %s and a relay role", st["relay"], st["role"], turn)
	}
	mesh, _ := st["mesh"].(map[string]any)
	for _, k := range []string{"advertise", "nat", "relays", "allocations", "peers"} {
		if _, ok := mesh[k]; !ok {
			t.Fatalf("mesh section lacks %q: %s", k, body)
		}
	}
	peers, _ := mesh["peers"].([]any)
	if len(peers) != 1 {
		t.Fatalf("mesh peers: %s", body)
	}
	peer := peers[0].(map[string]any)
	for _, k := range []string{"name", "path", "rtt_ms", "bytes_sent", "bytes_received", "since"} {
		if _, ok := peer[k]; !ok {
			t.Fatalf("peer lacks %q: %v", k, peer)
		}
	}
	if peer["name"] != "beta" || peer["path"] != "direct" || peer["bytes_sent"].(float64) == 0 {
		t.Fatalf("peer %v", peer)
	}
	var typed statusJSON
	json.Unmarshal([]byte(body), &typed)
	if len(typed.Services) != 1 || typed.Services[0] != (serviceJSON{Name: "wiki", Upstream: alpha.app.Services["wiki"]}) {
		t.Fatalf("services %+v", typed.Services)
	}
	for _, m := range typed.Members {
		if want := map[string]string{"alpha": "self", "beta": "direct"}[m.Name]; m.Path != want {
			t.Fatalf("member %s path %q, want %q", m.Name, m.Path, want)
		}
	}
	// Each member's clock offset is measured from probe acks (about one a
	// second per peer); on one machine it is small, within the maximum.
	if typed.MaxClockSkew != "1m0s" {
		t.Fatalf("max_clock_skew %q", typed.MaxClockSkew)
	}
	deadline := time.Now().Add(15 * time.Second)
	for betaClock := ""; betaClock == ""; {
		for _, m := range typed.Members {
			if m.Name == "beta" && m.ClockOffset != "" {
				d, err := time.ParseDuration(m.ClockOffset)
				if err != nil || d > time.Second || d < -time.Second || m.ClockSkewed {
					t.Fatalf("beta's clock offset %q skewed %v (%v)", m.ClockOffset, m.ClockSkewed, err)
				}
				betaClock = m.ClockOffset
			}
		}
		if betaClock == "" {
			if time.Now().After(deadline) {
				t.Fatalf("no clock offset measured for beta: %+v", typed.Members)
			}
			time.Sleep(100 * time.Millisecond) // polling interval
			_, body = get("http://" + admin + "/circle/status")
			typed = statusJSON{}
			json.Unmarshal([]byte(body), &typed)
		}
	}
	var out bytes.Buffer
	printStatus(&out, typed)
	for _, want := range []string{"PEER", "beta", "direct", " ms", "wiki", "mesh: advertising " + gossip, "CLOCK"} {
		if !strings.Contains(out.String(), want) {
			t.Fatalf("printed status lacks %q:\n%s", want, out.String())
		}
	}

	// The relay answers STUN with our address.
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refl, err := relay.Reflexive(pc, turn)
	pc.Close()
	if err != nil || refl.String() != pc.LocalAddr().String() {
		t.Fatalf("STUN through the relay: %v %v, want %v", refl, err, pc.LocalAddr())
	}

	// Nobody offers photos any more: 502.
	beta.stop()
	waitMeshPeers(t, alpha, nil, []string{"beta"})
	if code, body := get("http://" + httpAddr + "/"); code != http.StatusBadGateway {
		t.Fatalf("with beta gone: %d %q, want 502", code, body)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if c, err := alpha.app.node.DialService(ctx, "wiki"); err != nil {
		t.Fatalf("own service: %v", err)
	} else {
		c.Close()
	}
}
