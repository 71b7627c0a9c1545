package integration

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/cookiejar"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// demoBasePort finds a base port for `caddy circle demo` such that every
// port the demo derives from it (base+0..2, +10..12, +20..22, +30..32) is
// free for TCP and UDP on loopback.
func demoBasePort(t *testing.T) int {
	t.Helper()
	free := func(p int) bool {
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			return false
		}
		l.Close()
		u, err := net.ListenPacket("udp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			return false
		}
		u.Close()
		return true
	}
	for try := 0; try < 100; try++ {
		base := 30000 + rand.IntN(20000)
		ok := true
		for _, off := range []int{0, 1, 2, 10, 11, 12, 20, 21, 22, 30, 31, 32} {
			if !free(base + off) {
				ok = false
				break
			}
		}
		if ok {
			return base
		}
	}
	t.Fatal("no free port range for the demo")
	return 0
}

var (
	demoLogin = regexp.MustCompile(`Log in as:\s+(\S+) / (\S+)`)
	demoRoot  = regexp.MustCompile(`Root CA:\s+(\S+)`)
)

// TestDemo runs the README's first command, `caddy circle demo`, as a
// newcomer would: it must print a login and the root CA, the printed login
// must work on one node and open the demo app on another over TLS that
// verifies against the printed root, and Ctrl-C must stop everything and
// remove the demo's files.
func TestDemo(t *testing.T) {
	base := demoBasePort(t)
	cmd := exec.Command(caddyBin, "circle", "demo", "--base-port", fmt.Sprint(base))
	home := t.TempDir()
	cmd.Env = append(os.Environ(), "HOME="+home, "XDG_DATA_HOME="+filepath.Join(home, "data"),
		"XDG_CONFIG_HOME="+filepath.Join(home, "config"))
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr syncBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	var out syncBuffer
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stdout)
		signalled := false
		for sc.Scan() {
			fmt.Fprintln(&out, sc.Text())
			if !signalled && strings.Contains(sc.Text(), "Ctrl-C") {
				close(ready)
				signalled = true
			}
		}
		exited <- cmd.Wait()
	}()
	defer func() {
		if cmd.ProcessState == nil {
			cmd.Process.Signal(syscall.SIGKILL)
		}
		if t.Failed() {
			t.Logf("demo stdout:\n%s\ndemo stderr:\n%s", out.String(), tail(stderr.String(), 4000))
		}
	}()

	select {
	case <-ready:
	case err := <-exited:
		t.Fatalf("demo exited before it was ready: %v", err)
	case <-time.After(90 * time.Second):
		t.Fatal("demo did not become ready within 90 s")
	}
	printed := out.String()
	m := demoLogin.FindStringSubmatch(printed)
	r := demoRoot.FindStringSubmatch(printed)
	if m == nil || r == nil {
		t.Fatalf("demo did not print a login and a root CA:\n%s", printed)
	}
	user, pass, rootPath := m[1], m[2], r[1]
	demoDir := filepath.Dir(rootPath)
	pem, err := os.ReadFile(rootPath)
	if err != nil {
		t.Fatalf("printed root CA: %v", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		t.Fatalf("printed root CA %s holds no certificate", rootPath)
	}

	// A client that trusts only the printed root and resolves every
	// circle.localhost name to loopback, as browsers do.
	jar, _ := cookiejar.New(nil)
	dialer := &net.Dialer{Timeout: 5 * time.Second}
	client := &http.Client{
		Jar:     jar,
		Timeout: 15 * time.Second,
		Transport: &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: pool},
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				_, port, err := net.SplitHostPort(addr)
				if err != nil {
					return nil, err
				}
				return dialer.DialContext(ctx, network, "127.0.0.1:"+port)
			},
		},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}

	// Log in on beta with the printed login...
	body, _ := json.Marshal(map[string]string{"username": user, "password": pass})
	resp, err := client.Post(fmt.Sprintf("https://circle.localhost:%d/api/login", base+1), "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatalf("login on beta: %v", err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("login on beta with the printed credentials: %d", resp.StatusCode)
	}
	// ...and the demo app on gamma and alpha knows who we are.
	for _, port := range []int{base + 2, base} {
		req, _ := http.NewRequest("GET", fmt.Sprintf("https://app.circle.localhost:%d/", port), nil)
		req.Header.Set("Remote-User", "mallory")
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("demo app on port %d: %v", port, err)
		}
		page, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || !regexp.MustCompile(`Remote-User:\s+`+regexp.QuoteMeta(user)).Match(page) ||
			bytes.Contains(page, []byte("mallory")) {
			t.Fatalf("demo app on port %d: %d\n%s", port, resp.StatusCode, page)
		}
	}

	// Ctrl-C stops all three nodes and removes the demo's files.
	cmd.Process.Signal(os.Interrupt)
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("demo exited with %v after Ctrl-C", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("demo still running 30 s after Ctrl-C")
	}
	if _, err := os.Stat(demoDir); !os.IsNotExist(err) {
		t.Errorf("demo directory %s still there after Ctrl-C (%v)", demoDir, err)
	}
	for i := 0; i < 3; i++ {
		if c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", base+30+i), time.Second); err == nil {
			c.Close()
			t.Errorf("admin port %d still answers after Ctrl-C", base+30+i)
		}
	}
}
