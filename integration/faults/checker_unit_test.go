package faults

import (
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
