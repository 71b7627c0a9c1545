// Package relay gives every node of a circle a path to every other node
// across home NATs: STUN, TURN relays (pion/turn/v2) and one authenticated
// QUIC connection per peer path, with a memberlist transport on top. It
// imports no Caddy packages (deps_test.go at the repository root checks)
// and logs with log/slog.
//
// # Pieces
//
//   - Credentials: TURN long-term credentials derived from the circle
//     secret, REST-API style and time-limited (creds.go).
//   - Server: a TURN server (UDP relays) that also answers STUN Binding
//     requests, handed its socket. Only holders of the secret allocate;
//     allocations relay only to circle peers (ServerConfig.Peers), never
//     to loopback or the server's own addresses (server.go).
//   - Reflexive: a STUN client that finds a socket's server-reflexive
//     address; Mesh.Reflexive does it on a running mesh's socket (stun.go).
//   - Allocate: a TURN allocation with derived credentials, as a
//     net.PacketConn; pion refreshes it. Its doc lists the pion v2
//     pitfalls (client.go).
//   - Mesh: a primary socket (plain UDP, or a TURN relay conn with
//     MeshConfig.Via) plus any number of TURN relay conns (AddRelay),
//     mutually authenticated QUIC connections to peers (certificates signed
//     by a key derived from the secret, node name in the certificate;
//     certs.go): Connect (direct), ConnectVia (through a relay), Punch
//     (simultaneous dial to a reflexive address). Named service streams
//     (Dial, Listen, Handle), packets (SendPacket) and per-path status
//     (Paths). Traffic takes the best live path (direct, then punched,
//     then relayed), so a punched path takes over from a relay and the
//     relay, kept alive, takes over again when the punched path dies.
//     Duplicate connections are retired. The wire format is documented at
//     the top of mesh.go.
//   - Introductions: PunchVia asks a node both peers reach directly for
//     the other's public address (the source address it sees) and has it
//     tell the other to punch back at the same time; "observe" tells a node
//     its own address as another sees it; "relay" has a peer dial our
//     relayed address on a TURN server from its primary socket. Nodes pass
//     on the NAT kinds peers report (introduce.go).
//   - Transport: a memberlist.NodeAwareTransport over a Mesh that routes
//     by node name (transport.go); replicator.Config.Transport accepts it,
//     and the replicator's own streams ride along.
//   - Manager: the path policy (manager.go). It detects this node's NAT
//     (STUN at a relay's TURN server against the address the relay's mesh
//     sees), connects to every member direct, else punched, else relayed
//     (the symmetric side holds TURN allocations on up to two relays, so
//     failover is immediate, and replaces them before their credentials
//     expire), keeps punching pairs that are only relayed, and re-punches
//     when the home router gives us a new public port. PeerIPs feeds
//     ServerConfig.Peers. pion/ice/v2 was not used: QUIC's own
//     retransmitted Initials do the simultaneous open.
//
// # Limits
//
// Circle services (proxied HTTP to apps on other nodes) are mesh services
// named "svc/NAME", served and dialed by caddymodule (services.go,
// transport.go) with Listen/Handle and DialAny.
//
// TODO: the Transport's automatic connections go over the primary socket
// to the memberlist address only; members behind NAT are reached once the
// Manager connected them.
// TODO: an allocation whose refreshes fail is only noticed when the path
// to its relay drops or at renewal (pion reports refresh failures only in
// its logs).
package relay
