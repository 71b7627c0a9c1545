package caddymodule

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"text/template"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
)

// Demo defaults: alpha, beta and gamma serve HTTPS on base..base+2, HTTP on
// base+10.., gossip on base+20.. and their admin APIs on 127.0.0.1:base+30..,
// so one --base-port moves a whole demo out of another's way.
const (
	defaultDemoBasePort = 8441
	demoDomain          = "circle.localhost"
	demoStartTimeout    = 60 * time.Second
	demoStopTimeout     = 15 * time.Second
)

// demoNode is one node of the demo circle.
type demoNode struct {
	Name       string
	Domain     string
	Dir        string // the node's own directory (data, home, log)
	SecretFile string
	AdminPort  int
	HTTPPort   int
	HTTPSPort  int
	GossipPort int
	JoinPorts  []int

	cmd  *exec.Cmd
	done chan struct{} // closed when the process has exited
	err  error         // the process's exit status, set before done closes
}

// demoNodes lays out the three demo nodes under dir.
func demoNodes(dir string, base int) []*demoNode {
	names := []string{"alpha", "beta", "gamma"}
	var ns []*demoNode
	for i, name := range names {
		ns = append(ns, &demoNode{
			Name:       name,
			Domain:     demoDomain,
			Dir:        filepath.Join(dir, name),
			SecretFile: filepath.Join(dir, "secret"),
			AdminPort:  base + 30 + i,
			HTTPPort:   base + 10 + i,
			HTTPSPort:  base + i,
			GossipPort: base + 20 + i,
		})
	}
	for _, n := range ns {
		for _, o := range ns {
			if o != n {
				n.JoinPorts = append(n.JoinPorts, o.GossipPort)
			}
		}
	}
	return ns
}

// demoCaddyfileTmpl is the Caddyfile of a demo node; caddyfiles/demo-*.Caddyfile
// are its output for the default ports under /tmp/circle-demo.
var demoCaddyfileTmpl = template.Must(template.New("demo").Parse(`# Demo node {{.Name}} of ` + "`caddy circle demo`" + `: a three-node circle on loopback.
{
	admin 127.0.0.1:{{.AdminPort}}
	http_port {{.HTTPPort}}
	https_port {{.HTTPSPort}}
	persist_config off
	local_certs
	skip_install_trust
	storage circle
	circle {
		name {{.Name}}
		domain {{.Domain}}
		secret_file {{.SecretFile}}
		data_dir {{.Dir}}/data
		listen 127.0.0.1:{{.GossipPort}}
		join{{range .JoinPorts}} 127.0.0.1:{{.}}{{end}}
		replicas 2
	}
}

{{.Domain}}:{{.HTTPSPort}} {
	circle_portal
}

app.{{.Domain}}:{{.HTTPSPort}} {
	circle_auth
	header Content-Type "text/plain; charset=utf-8"
	respond <<TEXT
		Hello {http.request.header.Remote-Name}!

		This is the demo app on node {{.Name}}, behind circle_auth.
		It sees who you are from the headers the gate sets:

		Remote-User:   {http.request.header.Remote-User}
		Remote-Name:   {http.request.header.Remote-Name}
		Remote-Email:  {http.request.header.Remote-Email}
		Remote-Groups: {http.request.header.Remote-Groups}
		TEXT 200
}
`))

// caddyfile renders the node's Caddyfile.
func (n *demoNode) caddyfile() (string, error) {
	var b strings.Builder
	if err := demoCaddyfileTmpl.Execute(&b, n); err != nil {
		return "", err
	}
	return b.String(), nil
}

func (n *demoNode) adminAddr() string {
	return fmt.Sprintf("127.0.0.1:%d", n.AdminPort)
}

func (n *demoNode) logPath() string {
	return filepath.Join(n.Dir, "caddy.log")
}

// start writes the node's Caddyfile and starts `<exe> run` for it, with
// the node's own HOME/XDG directories so nothing is shared by accident.
func (n *demoNode) start(exe string) error {
	cfg, err := n.caddyfile()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(n.Dir, 0o700); err != nil {
		return err
	}
	cfgPath := filepath.Join(n.Dir, "Caddyfile")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		return err
	}
	logf, err := os.Create(n.logPath())
	if err != nil {
		return err
	}
	home := filepath.Join(n.Dir, "home")
	n.cmd = exec.Command(exe, "run", "--config", cfgPath, "--adapter", "caddyfile")
	n.cmd.Env = append(os.Environ(), "HOME="+home,
		"XDG_DATA_HOME="+filepath.Join(home, "data"), "XDG_CONFIG_HOME="+filepath.Join(home, "config"))
	n.cmd.Stdout, n.cmd.Stderr = logf, logf
	n.cmd.SysProcAttr = demoChildAttr()
	if err := n.cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("starting %s: %v", n.Name, err)
	}
	n.done = make(chan struct{})
	go func() {
		n.err = n.cmd.Wait()
		logf.Close()
		close(n.done)
	}()
	return nil
}

// stop asks the node to shut down gracefully (SIGTERM), and kills it if it
// has not exited within timeout.
func (n *demoNode) stop(timeout time.Duration) {
	if n.cmd == nil || n.cmd.Process == nil {
		return
	}
	select {
	case <-n.done:
		return
	default:
	}
	if err := n.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		n.cmd.Process.Kill()
	}
	select {
	case <-n.done:
	case <-time.After(timeout):
		n.cmd.Process.Kill()
		<-n.done
	}
}

// exited reports an error if the node's process has ended.
func (n *demoNode) exited() error {
	select {
	case <-n.done:
		return fmt.Errorf("node %s exited (%v); its log:\n%s", n.Name, n.err, tailFile(n.logPath(), 3000))
	default:
		return nil
	}
}

// tailFile returns at most the last max bytes of a file.
func tailFile(path string, max int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	if len(b) > max {
		b = append([]byte("..."), b[len(b)-max:]...)
	}
	return string(b)
}

// waitUntil polls cond until it returns nil, the node dies, ctx ends or
// timeout passes.
func (n *demoNode) waitUntil(ctx context.Context, timeout time.Duration, what string, cond func() error) error {
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		err := cond()
		if err == nil {
			return nil
		}
		if e := n.exited(); e != nil {
			return e
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: %s not within %v: %v", n.Name, what, timeout, err)
		}
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-tick.C:
		}
	}
}

// rootPEM fetches the node's internal CA root certificate (PEM).
func (n *demoNode) rootPEM() (string, error) {
	var ca struct {
		Root string `json:"root_certificate"`
	}
	if err := adminCall(n.adminAddr(), http.MethodGet, "/pki/ca/local", nil, &ca); err != nil {
		return "", err
	}
	if ca.Root == "" {
		return "", errors.New("no root certificate yet")
	}
	return ca.Root, nil
}

// servesTLS reports whether the node answers TLS for the portal's and the
// demo app's names with a chain that roots verify.
func (n *demoNode) servesTLS(roots *x509.CertPool) error {
	for _, name := range []string{n.Domain, "app." + n.Domain} {
		d := &net.Dialer{Timeout: 2 * time.Second}
		conn, err := tls.DialWithDialer(d, "tcp", fmt.Sprintf("127.0.0.1:%d", n.HTTPSPort),
			&tls.Config{ServerName: name, RootCAs: roots})
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		conn.Close()
	}
	return nil
}

func (n *demoNode) statusUp() error {
	var st statusJSON
	return adminCall(n.adminAddr(), http.MethodGet, "/circle/status", nil, &st)
}

func cmdDemo(fl caddycmd.Flags) (int, error) {
	base := fl.Int("base-port")
	if base <= 0 || base+32 > 65535 {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("--base-port %d out of range", base)
	}
	exe, err := os.Executable()
	if err != nil {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("finding this executable: %v", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	dir, err := os.MkdirTemp("", "circle-demo-")
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	nodes := demoNodes(dir, base)
	defer func() {
		for _, n := range nodes {
			n.stop(demoStopTimeout)
		}
		os.RemoveAll(dir)
	}()

	if err := os.WriteFile(filepath.Join(dir, "secret"), []byte(newSecret()+"\n"), 0o600); err != nil {
		return caddy.ExitCodeFailedStartup, err
	}

	fmt.Printf("starting a three-node circle in %s ...\n", dir)
	// alpha first and alone until its internal CA exists, so that beta and
	// gamma find that root in the shared storage instead of making their own.
	alpha := nodes[0]
	if err := alpha.start(exe); err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	var root string
	if err := alpha.waitUntil(ctx, demoStartTimeout, "internal CA root", func() error {
		var err error
		root, err = alpha.rootPEM()
		return err
	}); err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	for _, n := range nodes[1:] {
		if err := n.start(exe); err != nil {
			return caddy.ExitCodeFailedStartup, err
		}
	}
	for _, n := range nodes {
		if err := n.waitUntil(ctx, demoStartTimeout, "admin API", n.statusUp); err != nil {
			return caddy.ExitCodeFailedStartup, err
		}
	}
	// Only say "running" once every node completes a TLS handshake, trusted
	// by the shared root, for the portal and the app: the nodes obtain
	// their certificates in the background after their admin API is up.
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM([]byte(root)) {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("the internal CA root is not PEM")
	}
	for _, n := range nodes {
		if err := n.waitUntil(ctx, demoStartTimeout, "certificates", func() error { return n.servesTLS(roots) }); err != nil {
			return caddy.ExitCodeFailedStartup, err
		}
	}
	rootPath := filepath.Join(dir, "root.crt")
	if err := os.WriteFile(rootPath, []byte(root), 0o644); err != nil {
		return caddy.ExitCodeFailedStartup, err
	}

	password := demoPassword()
	if err := alpha.waitUntil(ctx, demoStartTimeout, "creating the demo account", func() error {
		return adminCall(alpha.adminAddr(), http.MethodPost, "/circle/users", newUserRequest{
			Username: "demo", Password: password, Name: "Demo Member",
			Email: "demo@" + demoDomain, Groups: []string{"family", "admins"},
		}, nil)
	}); err != nil {
		return caddy.ExitCodeFailedStartup, err
	}

	fmt.Printf("\nA circle of three nodes is running on loopback (domain %s):\n\n", demoDomain)
	for _, n := range nodes {
		fmt.Printf("  %-6s portal https://%s:%d/   app https://app.%s:%d/   admin %s\n",
			n.Name, demoDomain, n.HTTPSPort, demoDomain, n.HTTPSPort, n.adminAddr())
	}
	fmt.Printf("\nLog in as:   demo / %s\n", password)
	fmt.Printf("Root CA:     %s\n", rootPath)
	fmt.Printf("             (trust it in your browser, or: curl --cacert %s https://app.%s:%d/)\n",
		rootPath, demoDomain, nodes[0].HTTPSPort)
	fmt.Printf("Node logs:   %s/<node>/caddy.log\n", dir)
	fmt.Printf("Try:         caddy circle status --address %s\n", alpha.adminAddr())
	fmt.Printf("\nOpen https://app.%s:%d/ , log in, then open the app on the other ports: one login for all.\n",
		demoDomain, nodes[1].HTTPSPort)
	fmt.Printf("Your account and sessions: https://%s:%d/account ; invites and members (the demo account is an admin): https://%s:%d/admin\n",
		demoDomain, nodes[1].HTTPSPort, demoDomain, nodes[1].HTTPSPort)
	fmt.Println("Press Ctrl-C to stop.")

	// Wait for Ctrl-C or a node dying.
	died := make(chan *demoNode, len(nodes))
	for _, n := range nodes {
		go func(n *demoNode) {
			select {
			case <-n.done:
				died <- n
			case <-ctx.Done():
			}
		}(n)
	}
	select {
	case <-ctx.Done():
		fmt.Println("\nstopping the circle ...")
		return caddy.ExitCodeSuccess, nil
	case n := <-died:
		return caddy.ExitCodeFailedQuit, n.exited()
	}
}

// demoPassword returns a random, readable password for the demo account.
func demoPassword() string {
	b := make([]byte, 12)
	rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

// Interface guards
var _ caddycmd.CommandFunc = cmdDemo
