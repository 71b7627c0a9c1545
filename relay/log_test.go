package relay

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
)

// stringer counts how often it is formatted.
type stringer struct{ n *int }

func (s stringer) String() string { *s.n++; return "x" }

// TestPionLoggerLazy: pion's *f methods do not format below the enabled
// level (pion debug-logs every relayed packet), and do at or above it.
func TestPionLoggerLazy(t *testing.T) {
	var buf bytes.Buffer
	l := pionLogs{slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelInfo}))}.NewLogger("turn")
	var n int
	l.Debugf("packet %v", stringer{&n})
	l.Infof("packet %v", stringer{&n})
	if n != 0 {
		t.Errorf("disabled levels formatted %d times", n)
	}
	if allocs := testing.AllocsPerRun(100, func() { l.Debugf("packet %d %s", 1, "a") }); allocs > 0 {
		t.Errorf("disabled Debugf allocates %v times", allocs)
	}
	l.Warnf("warn %v", stringer{&n})
	l.Errorf("error %v", stringer{&n})
	if n != 2 || !strings.Contains(buf.String(), "warn x") || !strings.Contains(buf.String(), "error x") {
		t.Errorf("enabled levels: %d formats, log %q", n, buf.String())
	}
}
