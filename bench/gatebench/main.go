// Command gatebench measures what the circle_auth gate costs on the
// request path. It builds (or takes) the circle caddy binary, starts one
// single-node circle on loopback with three sites in front of the same
// upstream:
//
//	plain:   reverse_proxy
//	gate:    circle_auth + reverse_proxy
//	forward: forward_auth to the portal's /api/me (a local verifier, the
//	         architecture of Authelia-style gateways) + reverse_proxy
//
// and drives them with the same closed-loop load, in alternating rounds, so
// that machine noise hits all three alike. It prints requests/s per round
// and the ratios of the medians: gate/plain and forward/plain.
//
//	go run ./bench/gatebench [-rounds 5] [-duration 3s] [-conns 32]
package main

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	rounds := flag.Int("rounds", 5, "alternating rounds per configuration")
	duration := flag.Duration("duration", 3*time.Second, "length of one round")
	conns := flag.Int("conns", 32, "concurrent keep-alive connections")
	bin := flag.String("caddy", "", "circle caddy binary (default: build ./cmd/caddy)")
	flag.Parse()
	if err := run(*bin, *rounds, *duration, *conns); err != nil {
		fmt.Fprintln(os.Stderr, "gatebench:", err)
		os.Exit(1)
	}
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func run(bin string, rounds int, duration time.Duration, conns int) error {
	dir, err := os.MkdirTemp("", "gatebench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	if bin == "" {
		bin = filepath.Join(dir, "caddy")
		build := exec.Command("go", "build", "-o", bin, "./cmd/caddy")
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			return fmt.Errorf("building caddy: %w", err)
		}
	}

	// The upstream app: a small fixed response.
	ul, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	body := bytes.Repeat([]byte("x"), 512)
	go http.Serve(ul, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write(body) }))

	ports := map[string]int{}
	for _, k := range []string{"admin", "portal", "plain", "gate", "forward", "gossip", "http", "https"} {
		if ports[k], err = freePort(); err != nil {
			return err
		}
	}
	secret := make([]byte, 32)
	rand.Read(secret)
	secretFile := filepath.Join(dir, "secret")
	os.WriteFile(secretFile, []byte(base64.StdEncoding.EncodeToString(secret)), 0o600)
	cfg := fmt.Sprintf(`{
	admin 127.0.0.1:%[1]d
	http_port %[7]d
	https_port %[8]d
	auto_https off
	circle {
		name bench
		domain circle.localhost
		secret_file %[9]s
		data_dir %[10]s
		listen 127.0.0.1:%[6]d
		replicas 1
	}
}
http://circle.localhost:%[2]d {
	circle_portal
}
http://plain.circle.localhost:%[3]d {
	reverse_proxy %[11]s
}
http://gate.circle.localhost:%[4]d {
	circle_auth
	reverse_proxy %[11]s
}
http://forward.circle.localhost:%[5]d {
	forward_auth 127.0.0.1:%[2]d {
		uri /api/me
		header_up Host circle.localhost:%[2]d
	}
	reverse_proxy %[11]s
}
`, ports["admin"], ports["portal"], ports["plain"], ports["gate"], ports["forward"], ports["gossip"],
		ports["http"], ports["https"], secretFile, filepath.Join(dir, "data"), ul.Addr().String())
	cfgFile := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(cfgFile, []byte(cfg), 0o600); err != nil {
		return err
	}
	cmd := exec.Command(bin, "run", "--config", cfgFile, "--adapter", "caddyfile")
	cmd.Env = append(os.Environ(), "HOME="+dir, "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		return err
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()

	admin := fmt.Sprintf("http://127.0.0.1:%d", ports["admin"])
	if err := waitOK(admin+"/circle/status", 30*time.Second); err != nil {
		return fmt.Errorf("caddy did not come up: %w\n%s", err, logs.String())
	}
	user, _ := json.Marshal(map[string]any{"username": "bench", "password": "bench password 1", "groups": []string{"family"}})
	if resp, err := http.Post(admin+"/circle/users", "application/json", bytes.NewReader(user)); err != nil || resp.StatusCode/100 != 2 {
		return fmt.Errorf("adding user: %v %v", err, resp)
	}
	login, _ := json.Marshal(map[string]string{"username": "bench", "password": "bench password 1"})
	req, _ := http.NewRequest("POST", fmt.Sprintf("http://127.0.0.1:%d/api/login", ports["portal"]), bytes.NewReader(login))
	req.Host = fmt.Sprintf("circle.localhost:%d", ports["portal"])
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	var cookie *http.Cookie
	for _, c := range resp.Cookies() {
		if c.Name == "circle_session" {
			cookie = c
		}
	}
	if cookie == nil {
		return fmt.Errorf("login gave no session cookie (status %d)", resp.StatusCode)
	}

	targets := []struct{ name, host string }{
		{"plain", fmt.Sprintf("plain.circle.localhost:%d", ports["plain"])},
		{"gate", fmt.Sprintf("gate.circle.localhost:%d", ports["gate"])},
		{"forward", fmt.Sprintf("forward.circle.localhost:%d", ports["forward"])},
	}
	// Check each configuration answers 200 with the cookie (and the gate
	// refuses without it, so we are really measuring the gate).
	for i, tg := range targets {
		port := []int{ports["plain"], ports["gate"], ports["forward"]}[i]
		if st := status(port, tg.host, cookie); st != 200 {
			return fmt.Errorf("%s answered %d with a valid session", tg.name, st)
		}
		if tg.name != "plain" {
			if st := status(port, tg.host, nil); st == 200 {
				return fmt.Errorf("%s answered 200 without a session", tg.name)
			}
		}
	}

	results := map[string][]float64{}
	portOf := map[string]int{"plain": ports["plain"], "gate": ports["gate"], "forward": ports["forward"]}
	// Warm-up round, not counted.
	for _, tg := range targets {
		load(portOf[tg.name], tg.host, cookie, conns, duration/3)
	}
	for r := 0; r < rounds; r++ {
		for i := range targets {
			// Rotate the order each round so no configuration always goes first.
			tg := targets[(i+r)%len(targets)]
			rps, errs := load(portOf[tg.name], tg.host, cookie, conns, duration)
			results[tg.name] = append(results[tg.name], rps)
			fmt.Printf("round %d %-8s %9.0f req/s  (%d errors)\n", r+1, tg.name, rps, errs)
		}
	}
	med := func(xs []float64) float64 {
		s := append([]float64(nil), xs...)
		sort.Float64s(s)
		return s[len(s)/2]
	}
	p, g, f := med(results["plain"]), med(results["gate"]), med(results["forward"])
	fmt.Printf("\nmedian req/s: plain %.0f, circle_auth %.0f, forward_auth %.0f (%d conns, %v rounds of %v)\n",
		p, g, f, conns, rounds, duration)
	// Each round measures all three back to back, so the ratio within a
	// round cancels slow drifts of the machine; report the median of those
	// too.
	var gr, fr []float64
	for i := range results["plain"] {
		gr = append(gr, results["gate"][i]/results["plain"][i])
		fr = append(fr, results["forward"][i]/results["plain"][i])
	}
	fmt.Printf("ratio circle_auth/plain  = %.3f of medians, %.3f median of per-round ratios (target >= 0.95)\n", g/p, med(gr))
	fmt.Printf("ratio forward_auth/plain = %.3f of medians, %.3f median of per-round ratios\n", f/p, med(fr))
	return nil
}

func waitOK(u string, within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		resp, err := http.Get(u)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
			err = fmt.Errorf("status %d", resp.StatusCode)
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func status(port int, host string, cookie *http.Cookie) int {
	req, _ := http.NewRequest("GET", fmt.Sprintf("http://127.0.0.1:%d/", port), nil)
	req.Host = host
	req.Header.Set("Accept", "application/json")
	if cookie != nil {
		req.AddCookie(&http.Cookie{Name: cookie.Name, Value: cookie.Value})
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

// load runs conns closed-loop clients against port for d and returns the
// rate of 200 responses and the count of anything else.
func load(port int, host string, cookie *http.Cookie, conns int, d time.Duration) (float64, int64) {
	tr := &http.Transport{MaxIdleConnsPerHost: conns, MaxConnsPerHost: conns}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	var ok, bad atomic.Int64
	stop := time.Now().Add(d)
	var wg sync.WaitGroup
	u := fmt.Sprintf("http://127.0.0.1:%d/", port)
	start := time.Now()
	for i := 0; i < conns; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(stop) {
				req, _ := http.NewRequest("GET", u, nil)
				req.Host = host
				req.Header.Set("Accept", "application/json")
				req.AddCookie(&http.Cookie{Name: cookie.Name, Value: cookie.Value})
				resp, err := client.Do(req)
				if err != nil {
					bad.Add(1)
					continue
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode == 200 {
					ok.Add(1)
				} else {
					bad.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	return float64(ok.Load()) / time.Since(start).Seconds(), bad.Load()
}
