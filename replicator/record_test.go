package replicator

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func TestBeats(t *testing.T) {
	v1, v2 := Version{Time: 10, Node: "a"}, Version{Time: 20, Node: "a"}
	live1, live2 := meta{v: v1}, meta{v: v2}
	dead1, dead2 := meta{v: v1, deleted: true}, meta{v: v2, deleted: true}
	tests := []struct {
		name string
		fww  bool
		a, b meta
		want bool
	}{
		{"lww newer wins", false, live2, live1, true},
		{"lww older loses", false, live1, live2, false},
		{"lww equal no change", false, live1, live1, false},
		{"lww newer tombstone wins", false, dead2, live1, true},
		{"lww older tombstone loses", false, dead1, live2, false},
		{"tie broken by node", false, meta{v: Version{10, "b"}}, live1, true},
		{"fww older live wins", true, live1, live2, true},
		{"fww newer live loses", true, live2, live1, false},
		{"fww newer tombstone beats live", true, dead2, live1, true},
		{"fww older tombstone loses to live", true, dead1, live2, false},
		{"fww live after tombstone wins", true, live2, dead1, true},
		{"fww live before tombstone loses", true, live1, dead2, false},
		{"fww newer tombstone beats tombstone", true, dead2, dead1, true},
	}
	for _, tt := range tests {
		if got := beats(tt.fww, tt.a, tt.b); got != tt.want {
			t.Errorf("%s: beats = %v, want %v", tt.name, got, tt.want)
		}
	}
}

func TestHLC(t *testing.T) {
	now := time.UnixMilli(1_000_000)
	c := hlc{now: func() time.Time { return now }}
	a := c.next()
	if a != uint64(1_000_000)<<16 {
		t.Fatalf("first timestamp %x", a)
	}
	b := c.next()
	if b != a+1 {
		t.Fatalf("same millisecond: %x then %x", a, b)
	}
	now = now.Add(-time.Second) // the wall clock steps back
	if d := c.next(); d <= b {
		t.Fatalf("clock went back: %x after %x", d, b)
	}
	remote := uint64(2_000_000) << 16
	if !c.observe(remote) || c.next() <= remote {
		t.Fatal("observing a remote timestamp did not advance the clock")
	}
	if c.observe(5) {
		t.Fatal("observing an old timestamp moved the clock")
	}
	v := Version{Time: remote, Node: "n"}
	if !v.WallTime().Equal(time.UnixMilli(2_000_000)) {
		t.Fatalf("WallTime = %v", v.WallTime())
	}
}

func TestValidation(t *testing.T) {
	n := open(t, testConfig(t, t.TempDir(), "solo"))
	ctx := ctxT(t)
	cases := []struct {
		name          string
		bucket, key   string
		value         []byte
		wantSubstring string
	}{
		{"empty bucket", "", "k", nil, "empty bucket"},
		{"empty key", "b", "", nil, "empty key"},
		{"long bucket", strings.Repeat("b", MaxBucketLen+1), "k", nil, "bucket name is 65 bytes"},
		{"long key", "b", strings.Repeat("k", MaxKeyLen+1), nil, "1025 bytes"},
		{"big value", "b", "k", make([]byte, MaxValueLen+1), "value of b/k"},
	}
	for _, c := range cases {
		for _, err := range []error{n.Put(ctx, c.bucket, c.key, c.value), n.PutAsync(c.bucket, c.key, c.value)} {
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), c.wantSubstring) {
				t.Errorf("%s: err = %v", c.name, err)
			}
		}
	}
	if err := n.Put(ctx, "b", strings.Repeat("k", MaxKeyLen), make([]byte, MaxValueLen)); err != nil {
		t.Errorf("maximal record rejected: %v", err)
	}
	if _, err := n.Get("", "k"); !errors.Is(err, ErrInvalid) {
		t.Errorf("Get empty bucket: %v", err)
	}
	if _, err := n.List("", ""); !errors.Is(err, ErrInvalid) {
		t.Errorf("List empty bucket: %v", err)
	}

	bad := []Config{
		{DataDir: "x", Secret: testSecret},
		{Name: "n", Secret: testSecret},
		{Name: "n", DataDir: "x", Secret: []byte("short")},
		{Name: "n", DataDir: "x", Secret: testSecret, BindAddr: "nonsense"},
		{Name: strings.Repeat("n", 256), DataDir: "x", Secret: testSecret},
	}
	for _, cfg := range bad {
		if _, err := Open(cfg); !errors.Is(err, ErrInvalid) {
			t.Errorf("Open(%+v) = %v, want ErrInvalid", cfg, err)
		}
	}
}
