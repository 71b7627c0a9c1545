package netlab

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// etcNetns is where "ip netns exec" finds per-namespace files: it
// bind-mounts /etc/netns/NS/hosts over /etc/hosts for the commands it runs.
const etcNetns = "/etc/netns"

// SetHosts writes the hosts file that programs started with n.Command see
// as /etc/hosts (name -> address). The file is rewritten in place, so a
// process already running sees the new entries on its next lookup (Go's
// resolver re-reads /etc/hosts when its mtime changes). The file goes away
// with the lab. Goroutines switched into n with Run do not see it.
func (n *Node) SetHosts(entries map[string]netip.Addr) {
	n.lab.t.Helper()
	dir := filepath.Join(etcNetns, n.NS)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		n.lab.fatalf("SetHosts: %v", err)
	}
	names := make([]string, 0, len(entries))
	for name := range entries {
		names = append(names, name)
	}
	sort.Strings(names)
	var b strings.Builder
	b.WriteString("127.0.0.1\tlocalhost\n::1\tlocalhost\n")
	for _, name := range names {
		a := entries[name]
		if !allowed(a) && !a.IsLoopback() {
			n.lab.fatalf("SetHosts: %s for %s is outside the lab's ranges", a, name)
		}
		fmt.Fprintf(&b, "%s\t%s\n", a, name)
	}
	// Write in place (same inode): a bind mount of the old file would not
	// see a renamed replacement.
	if err := os.WriteFile(filepath.Join(dir, "hosts"), []byte(b.String()), 0o644); err != nil {
		n.lab.fatalf("SetHosts: %v", err)
	}
}

// removeEtc deletes the per-namespace files of ns (lab cleanup).
func removeEtc(ns string) { os.RemoveAll(filepath.Join(etcNetns, ns)) }

// SetAddr moves a host to a new address in the same subnet (a home whose
// DHCP lease or ISP address changed): the old address is removed, the new
// one added and the default route restored. Established connections of the
// old address die; partitions set up against the old address no longer
// apply to the new one.
func (n *Node) SetAddr(addr string) {
	n.lab.t.Helper()
	if n.kind != kindHost || n.Parent == nil {
		n.lab.fatalf("SetAddr: %s is not a host", n.Name)
	}
	a := mustAddr(n.lab, addr, n.Prefix)
	gw := n.Parent.Addr
	if n.Parent.kind == kindRouter {
		gw = n.Parent.Gateway
	}
	if a == gw {
		n.lab.fatalf("SetAddr: %s is the gateway address", a)
	}
	old := n.Addr
	// Removing the only address takes the default route with it; put both back.
	n.lab.sh("ip", "-n", n.NS, "addr", "del", netip.PrefixFrom(old, n.Prefix.Bits()).String(), "dev", "eth0")
	n.lab.sh("ip", "-n", n.NS, "addr", "add", netip.PrefixFrom(a, n.Prefix.Bits()).String(), "dev", "eth0")
	n.lab.sh("ip", "-n", n.NS, "route", "replace", "default", "via", gw.String())
	n.mu.Lock()
	n.Addr = a
	n.mu.Unlock()
}
