package relay_test

import (
	"log"
	"net"
	"net/netip"

	"github.com/homecircle/circle/relay"
	"github.com/homecircle/circle/replicator"
)

// A reachable node runs a TURN server on :3478 and a mesh on :7946; the
// replicator gossips and replicates over the mesh. (Compile-only.)
func Example() {
	secret := []byte("the 32-byte circle secret .....!")

	turnSock, err := net.ListenPacket("udp4", ":3478")
	if err != nil {
		log.Fatal(err)
	}
	srv, err := relay.NewServer(relay.ServerConfig{
		Secret:       secret,
		PacketConn:   turnSock,
		RelayAddress: net.ParseIP("198.51.100.1"),
		Peers:        func() []netip.Addr { return nil }, // the members' public addresses
	})
	if err != nil {
		log.Fatal(err)
	}
	defer srv.Close()

	meshSock, err := net.ListenPacket("udp4", ":7946")
	if err != nil {
		log.Fatal(err)
	}
	mesh, err := relay.NewMesh(relay.MeshConfig{
		Name: "r", Secret: secret, Conn: meshSock, AdvertiseAddr: "198.51.100.1:7946",
	})
	if err != nil {
		log.Fatal(err)
	}
	defer mesh.Close()

	tr, err := mesh.Transport()
	if err != nil {
		log.Fatal(err)
	}
	cfg := replicator.DefaultConfig()
	cfg.Name, cfg.DataDir, cfg.Secret, cfg.Transport = "r", "/var/lib/circle", secret, tr
	node, err := replicator.Open(cfg)
	if err != nil {
		log.Fatal(err)
	}
	defer node.Close()

	// A NATed node instead allocates on r and reaches its peers through
	// the relay, punching direct paths with r's help:
	//
	//	alloc, _ := relay.Allocate(relay.AllocateConfig{Conn: sock2, Server: "198.51.100.1:3478", Secret: secret, Node: "c"})
	//	mesh.AddRelay("r", alloc.PacketConn())
	//	mesh.ConnectVia(ctx, "a", "r", aPublicAddr)
	//	mesh.PunchVia(ctx, "b", "r")
	for _, p := range mesh.Paths() {
		log.Printf("%s: %s %s rtt=%v", p.Peer, p.Kind, p.Via, p.RTT)
	}
}
