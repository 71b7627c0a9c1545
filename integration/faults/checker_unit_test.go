package faults

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestCheckRegister pins the register rule on small histories (no
// processes, no namespaces).
func TestCheckRegister(t *testing.T) {
	s := time.Second
	w := func(id int, typ, value string, inv, done time.Duration) write {
		f := "put"
		if value == absent {
			f = "delete"
		}
		return write{op: Op{ID: id, F: f, Type: typ, Invoke: inv, Complete: done}, value: value}
	}
	for _, tc := range []struct {
		name   string
		final  string
		writes []write
		want   string // "" or a substring of the violation
	}{
		{"last ok write wins", "b", []write{initial(absent), w(1, "ok", "a", 1*s, 2*s), w(2, "ok", "b", 3*s, 4*s)}, ""},
		{"earlier ok write wins", "a", []write{initial(absent), w(1, "ok", "a", 1*s, 2*s), w(2, "ok", "b", 3*s, 4*s)}, "acknowledged write lost"},
		{"concurrent writes either way", "a", []write{initial(absent), w(1, "ok", "a", 1*s, 3*s), w(2, "ok", "b", 2*s, 4*s)}, ""},
		{"info write may win later", "a", []write{initial(absent), w(1, "info", "a", 1*s, 2*s), w(2, "ok", "b", 3*s, 4*s)}, ""},
		{"failed write never wins", "a", []write{initial(absent), w(1, "fail", "a", 1*s, 2*s), w(2, "ok", "b", 3*s, 4*s)}, "acknowledged write lost"},
		{"deleted key resurrected", "a", []write{initial(absent), w(1, "ok", "a", 1*s, 2*s), w(2, "ok", absent, 3*s, 4*s)}, "resurrected"},
		{"acknowledged write missing", absent, []write{initial(absent), w(1, "ok", "a", 1*s, 2*s)}, "acknowledged write lost"},
		{"nothing written", absent, []write{initial(absent)}, ""},
		{"delete after write", absent, []write{initial(absent), w(1, "ok", "a", 1*s, 2*s), w(2, "ok", absent, 3*s, 4*s)}, ""},
		{"disable undone", "false", []write{initial("false"), {op: Op{ID: 1, F: "disable", Type: "ok", Invoke: s, Complete: 2 * s}, value: "true"}}, "disable undone"},
		{"enable after disable", "false", []write{initial("false"),
			{op: Op{ID: 1, F: "disable", Type: "ok", Invoke: s, Complete: 2 * s}, value: "true"},
			{op: Op{ID: 2, F: "enable", Type: "ok", Invoke: 3 * s, Complete: 4 * s}, value: "false"}}, ""},
	} {
		got := checkRegister("k", tc.final, tc.writes)
		if tc.want == "" && got != "" || tc.want != "" && !strings.Contains(got, tc.want) {
			t.Errorf("%s: got %q, want %q", tc.name, got, tc.want)
		}
	}
}

// TestPrepareDumps pins what the dump comparison leaves out: tombstones
// the nodes may collect at different moments, and keys kept aside because
// a version is beyond the clock skew bound of a node that lacks it (judged
// by the version that will win).
func TestPrepareDumps(t *testing.T) {
	now := time.Now()
	ms := func(d time.Duration) int64 { return now.Add(d).UnixMilli() }
	ver := func(d time.Duration, node string) string { return fmt.Sprintf("%d.0@%s", ms(d), node) }
	old := dumpRecord{Bucket: "reg", Key: "gone", Version: ver(-time.Hour, "alpha"), WallMS: ms(-time.Hour), Deleted: true}
	recent := dumpRecord{Bucket: "reg", Key: "del", Version: ver(-time.Second, "alpha"), WallMS: ms(-time.Second), Deleted: true}
	mine := dumpRecord{Bucket: "reg", Key: "r0", Version: ver(0, "alpha"), WallMS: ms(0), Value: "a"}
	fast := dumpRecord{Bucket: "reg", Key: "r0", Version: ver(10*time.Minute, "gamma"), WallMS: ms(10 * time.Minute), Value: "g"}
	ds := map[string]*dump{
		"alpha": {Node: "alpha", Records: []dumpRecord{old, recent, mine}},
		"gamma": {Node: "gamma", Records: []dumpRecord{recent, fast}},
	}
	prepare(ds, map[string]time.Duration{"gamma": 10 * time.Minute}, 20*time.Minute, now)
	if !identical(ds) {
		t.Fatalf("not identical: %s", dumpDiff(ds))
	}
	if !ds["alpha"].deferred["reg/r0"] || ds["alpha"].value("reg", "r0") != "g" || ds["gamma"].value("reg", "r0") != "g" {
		t.Fatalf("r0: deferred %v, values %q %q", ds["alpha"].deferred, ds["alpha"].value("reg", "r0"), ds["gamma"].value("reg", "r0"))
	}
	if len(ds["alpha"].cmp) != 1 || ds["alpha"].cmp[0].Key != "del" {
		t.Fatalf("compared on alpha: %+v", ds["alpha"].cmp)
	}
	// A recent tombstone missing on one node is a difference.
	ds["gamma"].Records = []dumpRecord{fast}
	prepare(ds, nil, 20*time.Minute, now)
	if identical(ds) {
		t.Fatal("a missing recent tombstone went unnoticed")
	}
}

// TestCheckDisabled pins the monotone disable rule.
func TestCheckDisabled(t *testing.T) {
	s := time.Second
	w := func(id int, node, typ, value string, inv, done time.Duration) write {
		f := "disable"
		if value == "false" {
			f = "enable"
		}
		return write{op: Op{ID: id, F: f, Node: node, Type: typ, Invoke: inv, Complete: done}, value: value}
	}
	dis := w(1, "gamma", "ok", "true", 1*s, 2*s)
	enOther := w(2, "beta", "ok", "false", 3*s, 4*s)
	enSame := w(3, "gamma", "ok", "false", 3*s, 4*s)
	for _, tc := range []struct {
		name     string
		disabled bool
		ws       []write
		ok       bool
	}{
		{"disable holds", true, []write{dis}, true},
		{"disable lost", false, []write{dis}, false},
		{"enable elsewhere may not have seen it", true, []write{dis, enOther}, true},
		{"enable elsewhere may have seen it", false, []write{dis, enOther}, true},
		{"enable on its node lifted it", true, []write{dis, enSame}, false},
		{"never disabled", true, nil, false},
	} {
		if got := checkDisabled("d", tc.disabled, tc.ws) == ""; got != tc.ok {
			t.Errorf("%s: consistent = %v, want %v", tc.name, got, tc.ok)
		}
	}
}
