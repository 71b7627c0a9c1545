// Package caddyfiles_test adapts every example Caddyfile in this folder and
// compares the result with its golden JSON (`go test -update` rewrites them).
package caddyfiles_test

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/homecircle/circle/caddymodule"
)

var update = flag.Bool("update", false, "rewrite the golden .json files")

// testSecret is what CIRCLE_SECRET holds while adapting: it must never show
// up in adapted JSON (secrets are resolved at Provision, not at adapt time).
const testSecret = "q1ZAbJ3xDdN0iF9o0r5f3f2Xb2sU4oXbqV0JwQ6pG3E="

func adapt(t *testing.T, name string, body []byte) ([]byte, error) {
	t.Helper()
	adapter := caddyconfig.GetAdapter("caddyfile")
	if adapter == nil {
		t.Fatal("caddyfile adapter not registered")
	}
	out, warnings, err := adapter.Adapt(body, map[string]any{"filename": name})
	if err != nil {
		return nil, err
	}
	for _, w := range warnings {
		t.Logf("%s: warning: %s", name, w.String())
	}
	var buf bytes.Buffer
	if err := json.Indent(&buf, out, "", "\t"); err != nil {
		t.Fatal(err)
	}
	buf.WriteByte('\n')
	return buf.Bytes(), nil
}

func TestAdaptExamples(t *testing.T) {
	t.Setenv("CIRCLE_SECRET", testSecret)
	files, err := filepath.Glob("*.Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) < 5 {
		t.Fatalf("found %d example Caddyfiles, want at least 5: %v", len(files), files)
	}
	for _, file := range files {
		t.Run(file, func(t *testing.T) {
			body, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			got, err := adapt(t, file, body)
			if err != nil {
				t.Fatalf("adapting: %v", err)
			}
			if bytes.Contains(got, []byte(testSecret)) {
				t.Fatalf("adapted JSON contains the secret:\n%s", got)
			}
			var cfg struct {
				Storage struct {
					Module string `json:"module"`
				} `json:"storage"`
				Apps map[string]json.RawMessage `json:"apps"`
			}
			if err := json.Unmarshal(got, &cfg); err != nil {
				t.Fatal(err)
			}
			if cfg.Storage.Module != "circle" {
				t.Errorf("storage module %q, want circle", cfg.Storage.Module)
			}
			if _, ok := cfg.Apps["circle"]; !ok {
				t.Errorf("no circle app in %s", got)
			}

			golden := strings.TrimSuffix(file, ".Caddyfile") + ".json"
			if *update {
				if err := os.WriteFile(golden, got, 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test -update)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("adapted %s differs from %s (run go test -update to accept):\n%s", file, golden, got)
			}
		})
	}
}

// TestAdaptRefusesSecrets: a secret that would end up in the adapted JSON
// is refused, and the error does not repeat it.
func TestAdaptRefusesSecrets(t *testing.T) {
	t.Setenv("CIRCLE_SECRET", testSecret)
	for name, body := range map[string]string{
		"literal":            "{\n\tcircle {\n\t\tname a\n\t\tdomain d.example\n\t\tsecret " + testSecret + "\n\t}\n}\n",
		"parse-time env var": "{\n\tcircle {\n\t\tname a\n\t\tdomain d.example\n\t\tsecret {$CIRCLE_SECRET}\n\t}\n}\n",
	} {
		t.Run(name, func(t *testing.T) {
			_, err := adapt(t, "Caddyfile", []byte(body))
			if err == nil {
				t.Fatal("adapted a config with a literal secret")
			}
			if strings.Contains(err.Error(), testSecret) {
				t.Fatalf("error repeats the secret: %v", err)
			}
		})
	}
}

func TestAdaptUnknownSubdirective(t *testing.T) {
	_, err := adapt(t, "Caddyfile", []byte("{\n\tcircle {\n\t\tname a\n\t\tsecrte_file /x\n\t}\n}\n"))
	if err == nil || !strings.Contains(err.Error(), "unrecognized subdirective") {
		t.Fatalf("error %v, want unrecognized subdirective", err)
	}
}
