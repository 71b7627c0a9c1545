package relay_test

import (
	"fmt"
	"testing"
	"time"
)

// A mesh hello from a later release (its header version above 1, JSON
// fields this release does not know) is still read: the hello is JSON,
// extensible by fields, so its version byte must not cut the peer off.
func TestMeshHelloOfLaterRelease(t *testing.T) {
	a := newMesh(t, "alice", testSecret)
	b := newMesh(t, "bob", testSecret)
	if err := a.Connect(ctxT(t, 5*time.Second), "bob", b.Addr()); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "bob has alice's hello", func() bool { return b.HelloFrom("alice") })
	inc := func() uint64 {
		for _, p := range b.Paths() {
			if p.Peer == "alice" {
				return p.Inc
			}
		}
		return 0
	}
	first := inc()
	for i, v := range []byte{1, 2} {
		want := first + uint64(i) + 1000
		body := fmt.Sprintf(`{"inc":%d,"addr":%q,"proto":[1,%d],"caps":["future"]}`, want, a.Addr().String(), v)
		if err := a.SendRawHello("bob", v, []byte(body)); err != nil {
			t.Fatal(err)
		}
		eventually(t, 5*time.Second, fmt.Sprintf("bob reads alice's hello of version %d with unknown fields", v), func() bool { return inc() == want })
	}
}
