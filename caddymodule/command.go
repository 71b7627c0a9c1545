package caddymodule

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strings"
	"text/tabwriter"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
)

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "circle",
		Usage: "secret | user add | invite | status | demo",
		Short: "Manages a circle of Caddy nodes",
		Long: `
Commands for a Circle: friends' home servers acting as one, with one domain,
one set of accounts and log in once.

The subcommands that talk to a node use its admin API, like caddy reload:
--address (default: Caddy's default admin address), or the admin address of
the config given with --config/--adapter.

  caddy circle secret                 prints a new circle secret
  caddy circle user add --username U [--groups a,b] [--name N] [--email E] --password-stdin
  caddy circle invite [--groups a,b] [--ttl 72h]
  caddy circle status [--json]
  caddy circle demo [--base-port 8441]
`,
		CobraFunc: func(cmd *cobra.Command) {
			cmd.AddCommand(&cobra.Command{
				Use:   "secret",
				Short: "Prints a new circle secret (base64 of 32 random bytes)",
				Args:  cobra.NoArgs,
				RunE:  caddycmd.WrapCommandFuncForCobra(cmdSecret),
			})

			user := &cobra.Command{
				Use:   "user",
				Short: "Manages accounts",
			}
			add := &cobra.Command{
				Use:   "add --username <name> [--groups <a,b>] [--name <full name>] [--email <email>] --password-stdin [--address <admin>]",
				Short: "Adds an account to the circle",
				Long: `
Adds an account through the node's admin API. The password is read from the
first line of standard input (--password-stdin), so it stays out of the
shell history and the process list.
`,
				Args: cobra.NoArgs,
				RunE: caddycmd.WrapCommandFuncForCobra(cmdUserAdd),
			}
			add.Flags().String("username", "", "Username (required)")
			add.Flags().String("groups", "", "Comma-separated groups")
			add.Flags().String("name", "", "Display name")
			add.Flags().String("email", "", "Email address")
			add.Flags().Bool("password-stdin", false, "Read the password from standard input (required)")
			addAdminFlags(add)
			user.AddCommand(add)
			cmd.AddCommand(user)

			invite := &cobra.Command{
				Use:   "invite [--groups <a,b>] [--ttl <duration>] [--address <admin>]",
				Short: "Prints an invite URL for registration",
				Args:  cobra.NoArgs,
				RunE:  caddycmd.WrapCommandFuncForCobra(cmdInvite),
			}
			invite.Flags().String("groups", "", "Comma-separated groups the new member joins")
			invite.Flags().String("ttl", "72h", "How long the invite is valid")
			addAdminFlags(invite)
			cmd.AddCommand(invite)

			status := &cobra.Command{
				Use:   "status [--json] [--address <admin>]",
				Short: "Shows the circle's members, paths, replication and this node's role",
				Args:  cobra.NoArgs,
				RunE:  caddycmd.WrapCommandFuncForCobra(cmdStatus),
			}
			status.Flags().Bool("json", false, "Print the raw JSON status")
			addAdminFlags(status)
			cmd.AddCommand(status)

			demo := &cobra.Command{
				Use:   "demo [--base-port <port>]",
				Short: "Runs a three-node circle on loopback with a demo app behind the gate",
				Long: `
Starts three nodes (alpha, beta, gamma) of a fresh circle on loopback, as
child processes of this binary, on HTTPS ports base-port, base-port+1 and
base-port+2 of circle.localhost, shares their internal CA through the
circle, creates a demo account and prints the URLs, the login and the root
certificate's path. Ctrl-C stops the nodes and removes their files.
`,
				Args: cobra.NoArgs,
				RunE: caddycmd.WrapCommandFuncForCobra(cmdDemo),
			}
			demo.Flags().Int("base-port", defaultDemoBasePort, "HTTPS port of the first node")
			cmd.AddCommand(demo)
		},
	})
}

// addAdminFlags adds the flags that choose the node's admin endpoint.
func addAdminFlags(c *cobra.Command) {
	c.Flags().String("address", "", "The address of the node's admin API (default: Caddy's default admin address)")
	c.Flags().StringP("config", "c", "", "Configuration file whose admin address to use (instead of --address)")
	c.Flags().StringP("adapter", "a", "", "Name of config adapter to apply (with --config)")
}

// adminAddress resolves the admin endpoint as `caddy reload` does.
func adminAddress(fl caddycmd.Flags) (string, error) {
	addr, err := caddycmd.DetermineAdminAPIAddress(fl.String("address"), nil, fl.String("config"), fl.String("adapter"))
	if err != nil {
		return "", fmt.Errorf("couldn't determine admin API address: %v", err)
	}
	return addr, nil
}

// adminCall sends a JSON request to the admin API at addr and decodes the
// JSON answer into out (if non-nil).
func adminCall(addr, method, uri string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	resp, err := caddycmd.AdminAPIRequest(addr, method, uri, make(http.Header), rd)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		_, err = io.Copy(io.Discard, resp.Body)
		return err
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("decoding admin API answer: %v", err)
	}
	return nil
}

// newSecret returns a fresh circle secret: base64 of 32 random bytes.
func newSecret() string {
	b := make([]byte, secretLen)
	rand.Read(b)
	return base64.StdEncoding.EncodeToString(b)
}

func cmdSecret(caddycmd.Flags) (int, error) {
	fmt.Println(newSecret())
	return caddy.ExitCodeSuccess, nil
}

// splitList splits a comma-separated flag value, dropping empty items.
func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// readPassword reads the first line of r, without its line ending.
func readPassword(r io.Reader) (string, error) {
	line, err := bufio.NewReader(r).ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		return "", err
	}
	line = strings.TrimSuffix(strings.TrimSuffix(line, "\n"), "\r")
	if line == "" {
		return "", errors.New("no password on standard input")
	}
	return line, nil
}

func cmdUserAdd(fl caddycmd.Flags) (int, error) {
	username := fl.String("username")
	if username == "" {
		return caddy.ExitCodeFailedStartup, errors.New("--username is required")
	}
	if !fl.Bool("password-stdin") {
		return caddy.ExitCodeFailedStartup, errors.New("--password-stdin is required: pass the password on standard input")
	}
	password, err := readPassword(os.Stdin)
	if err != nil {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("reading password: %v", err)
	}
	addr, err := adminAddress(fl)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	var acct accountJSON
	err = adminCall(addr, http.MethodPost, "/circle/users", newUserRequest{
		Username: username,
		Password: password,
		Name:     fl.String("name"),
		Email:    fl.String("email"),
		Groups:   splitList(fl.String("groups")),
	}, &acct)
	if err != nil {
		return caddy.ExitCodeFailedQuit, err
	}
	fmt.Printf("added %s (groups: %s)\n", acct.Username, strings.Join(acct.Groups, ","))
	return caddy.ExitCodeSuccess, nil
}

func cmdInvite(fl caddycmd.Flags) (int, error) {
	addr, err := adminAddress(fl)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	var inv inviteJSON
	err = adminCall(addr, http.MethodPost, "/circle/invites", inviteRequest{
		Groups: splitList(fl.String("groups")),
		TTL:    fl.String("ttl"),
	}, &inv)
	if err != nil {
		return caddy.ExitCodeFailedQuit, err
	}
	fmt.Println(inv.URL)
	fmt.Fprintf(os.Stderr, "valid until %s\n", inv.Expires.Local().Format("2006-01-02 15:04 MST"))
	return caddy.ExitCodeSuccess, nil
}

func cmdStatus(fl caddycmd.Flags) (int, error) {
	addr, err := adminAddress(fl)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	var raw json.RawMessage
	if err := adminCall(addr, http.MethodGet, "/circle/status", nil, &raw); err != nil {
		return caddy.ExitCodeFailedQuit, err
	}
	if fl.Bool("json") {
		var buf bytes.Buffer
		json.Indent(&buf, raw, "", "  ")
		fmt.Println(buf.String())
		return caddy.ExitCodeSuccess, nil
	}
	var st statusJSON
	if err := json.Unmarshal(raw, &st); err != nil {
		return caddy.ExitCodeFailedQuit, fmt.Errorf("decoding status: %v", err)
	}
	printStatus(os.Stdout, st)
	return caddy.ExitCodeSuccess, nil
}

// printStatus writes st as a human-readable table.
func printStatus(w io.Writer, st statusJSON) {
	fmt.Fprintf(w, "node %s of circle %s, role: %s\n", st.Name, st.Domain, st.Role)
	if st.Relay != "" {
		fmt.Fprintf(w, "relay: serving TURN/STUN for the circle at %s\n", st.Relay)
	}
	health := "healthy"
	if !st.Replication.Healthy {
		health = "degraded: fewer nodes up than replicas"
	}
	if n := st.Replication.UnderReplicated; n > 0 {
		health = fmt.Sprintf("degraded: %d records on fewer than %d nodes", n, st.Replication.Replicas)
	}
	fmt.Fprintf(w, "replication: %s (replicas %d, %d peers alive), %d accounts\n\n",
		health, st.Replication.Replicas, st.Replication.AlivePeers, st.Accounts)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "MEMBER\tADDRESS\tSTATE\tPATH\tCLOCK")
	for _, m := range st.Members {
		path := m.Path
		if path == "" {
			path = "-"
		}
		clock := "-"
		if m.ClockOffset != "" {
			clock = m.ClockOffset
			if !strings.HasPrefix(clock, "-") {
				clock = "+" + clock
			}
			if m.ClockSkewed {
				clock += " (beyond max " + st.MaxClockSkew + ": records kept aside)"
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", m.Name, m.Addr, m.State, path, clock)
	}
	tw.Flush()
	printMesh(w, st.Mesh)
	printServices(w, st.Services)
	printCertificates(w, st.Certificates)
}

// printMesh writes the mesh section: NAT, relays and one line per peer.
func printMesh(w io.Writer, m *meshJSON) {
	if m == nil {
		return
	}
	fmt.Fprintln(w)
	nat := m.NAT
	switch nat {
	case "none":
		nat = "reachable (no NAT)"
	case "cone":
		nat = "behind a cone NAT (hole punching works)"
	case "symmetric":
		nat = "behind a symmetric NAT (needs a relay)"
	case "", "unknown":
		nat = "NAT not measured yet"
	}
	line := fmt.Sprintf("mesh: advertising %s, %s", m.Advertise, nat)
	if m.Public != "" {
		line += ", public address " + m.Public
	}
	fmt.Fprintln(w, line)
	if len(m.Relays) > 0 {
		names := make([]string, 0, len(m.Relays))
		for n := range m.Relays {
			names = append(names, n)
		}
		sort.Strings(names)
		var parts []string
		for _, n := range names {
			parts = append(parts, n+" ("+m.Relays[n]+")")
		}
		fmt.Fprintln(w, "relays of the circle: "+strings.Join(parts, ", "))
	}
	for _, a := range m.Allocations {
		fmt.Fprintf(w, "relayed address %s on %s, since %s\n", a.RelayAddr, a.Relay, a.Since.Local().Format("2006-01-02 15:04:05"))
	}
	if len(m.Peers) == 0 {
		fmt.Fprintln(w, "no other member is alive")
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PEER\tPATH\tRTT\tSENT\tRECEIVED\tSINCE")
	var notes []string
	for _, p := range m.Peers {
		rtt, since := "-", "-"
		if p.Path != "none" {
			rtt = fmt.Sprintf("%.1f ms", p.RTTMillis)
		}
		if p.Since != nil {
			since = p.Since.Local().Format("2006-01-02 15:04:05")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", p.Name, p.Path, rtt,
			humanBytes(p.BytesSent), humanBytes(p.BytesReceived), since)
		if p.LastError != "" {
			notes = append(notes, fmt.Sprintf("%s: last error: %s", p.Name, p.LastError))
		}
	}
	tw.Flush()
	for _, n := range notes {
		fmt.Fprintln(w, "  "+n)
	}
}

// printServices lists the circle services this node offers.
func printServices(w io.Writer, svcs []serviceJSON) {
	fmt.Fprintln(w)
	if len(svcs) == 0 {
		fmt.Fprintln(w, "this node offers no circle services")
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SERVICE\tUPSTREAM")
	for _, s := range svcs {
		fmt.Fprintf(tw, "%s\t%s\n", s.Name, s.Upstream)
	}
	tw.Flush()
}

// humanBytes formats a byte count: 512 B, 1.5 KiB, 3.2 MiB...
func humanBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit && exp < 4; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTP"[exp])
}

// printCertificates writes the managed certificates as a table, followed
// by their problems and last errors.
func printCertificates(w io.Writer, certs []certJSON) {
	fmt.Fprintln(w)
	if len(certs) == 0 {
		fmt.Fprintln(w, "no certificates in the circle's storage")
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "CERTIFICATE\tEXPIRES\tRENEWED BY\tRENEWED AT\tSTATUS")
	var notes []string
	for _, c := range certs {
		names := strings.Join(c.Names, ",")
		expires := "-"
		if !c.NotAfter.IsZero() {
			expires = c.NotAfter.Local().Format("2006-01-02 15:04:05")
		}
		renewedAt := "-"
		if !c.RenewedAt.IsZero() {
			renewedAt = c.RenewedAt.Local().Format("2006-01-02 15:04:05")
		}
		renewedBy := c.RenewedBy
		if renewedBy == "" {
			renewedBy = "-"
		}
		status := "ok"
		switch {
		case c.Problem != "":
			status = "unusable"
			notes = append(notes, fmt.Sprintf("%s: %s", names, c.Problem))
		case c.LastError != "":
			status = "renewal failing"
		}
		if c.LastError != "" {
			notes = append(notes, fmt.Sprintf("%s: last error on %s at %s: %s", names, c.LastErrorNode,
				c.LastErrorTime.Local().Format("2006-01-02 15:04:05"), c.LastError))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", names, expires, renewedBy, renewedAt, status)
	}
	tw.Flush()
	for _, n := range notes {
		fmt.Fprintln(w, "  "+n)
	}
}

// Interface guards
var (
	_ caddycmd.CommandFunc = cmdSecret
	_ caddycmd.CommandFunc = cmdUserAdd
	_ caddycmd.CommandFunc = cmdInvite
	_ caddycmd.CommandFunc = cmdStatus
)
