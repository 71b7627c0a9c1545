package replicator

import (
	"errors"
	"testing"
)

func TestListWithTombstones(t *testing.T) {
	n := open(t, testConfig(t, t.TempDir(), "solo"))
	ctx := ctxT(t)
	for _, k := range []string{"a", "b", "c"} {
		if err := n.Put(ctx, "files", k, []byte("v-"+k)); err != nil {
			t.Fatal(err)
		}
	}
	if err := n.Delete(ctx, "files", "b"); err != nil {
		t.Fatal(err)
	}
	all, err := n.ListWithTombstones("files", "")
	if err != nil || len(all) != 3 {
		t.Fatalf("ListWithTombstones = %+v, %v", all, err)
	}
	if all[0].Key != "a" || all[0].Deleted || string(all[0].Value) != "v-a" ||
		all[1].Key != "b" || !all[1].Deleted || all[1].Value != nil || all[1].Version.IsZero() ||
		all[2].Key != "c" || all[2].Deleted {
		t.Fatalf("ListWithTombstones = %+v", all)
	}
	if none, err := n.ListWithTombstones("nothing", ""); err != nil || len(none) != 0 {
		t.Fatalf("empty bucket: %+v, %v", none, err)
	}
	if _, err := n.ListWithTombstones("", ""); !errors.Is(err, ErrInvalid) {
		t.Fatalf("bad bucket: %v", err)
	}
}
