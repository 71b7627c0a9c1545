package caddymodule

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
)

func TestUnmarshalGlobalCircle(t *testing.T) {
	for _, tc := range []struct {
		name    string
		input   string
		want    App
		wantErr string // substring of the error; "" means success
	}{
		{
			name: "full",
			input: `circle {
				name        alpha
				domain      ourcircle.net
				secret_file /etc/circle/secret
				data_dir    /var/lib/circle
				listen      0.0.0.0:7946
				advertise   198.18.0.10:7946
				join        198.18.0.11:7946 beta.ourcircle.net:7946
				replicas    2
				relay       :3478
				max_clock_skew 90s
			}`,
			want: App{
				Name: "alpha", DomainName: "ourcircle.net", SecretFile: "/etc/circle/secret",
				DataDir: "/var/lib/circle", Listen: "0.0.0.0:7946", Advertise: "198.18.0.10:7946",
				Join:     []string{"198.18.0.11:7946", "beta.ourcircle.net:7946"},
				Replicas: 2, Relay: ":3478", MaxClockSkew: caddy.Duration(90 * time.Second),
			},
		},
		{
			name:  "minimal",
			input: "circle {\n name a\n domain d.example\n secret_file /s\n}",
			want:  App{Name: "a", DomainName: "d.example", SecretFile: "/s"},
		},
		{
			name:  "join repeated appends",
			input: "circle {\n join a:1\n join b:2 c:3\n}",
			want:  App{Join: []string{"a:1", "b:2", "c:3"}},
		},
		{
			name:  "secret env placeholder",
			input: "circle {\n secret {env.CIRCLE_SECRET}\n}",
			want:  App{Secret: "{env.CIRCLE_SECRET}"},
		},
		{
			name:  "secret file placeholder",
			input: "circle {\n secret {file./run/secrets/circle}\n}",
			want:  App{Secret: "{file./run/secrets/circle}"},
		},
		{name: "empty block", input: "circle {\n}", want: App{}},
		{name: "no block", input: "circle", want: App{}},
		{name: "unknown subdirective", input: "circle {\n nmae alpha\n}", wantErr: `unrecognized subdirective "nmae"`},
		{name: "argument on option", input: "circle alpha {\n}", wantErr: "wrong argument count"},
		{name: "name without value", input: "circle {\n name\n}", wantErr: "wrong argument count"},
		{name: "name with two values", input: "circle {\n name a b\n}", wantErr: "wrong argument count"},
		{name: "name twice", input: "circle {\n name a\n name b\n}", wantErr: "name specified more than once"},
		{name: "join without value", input: "circle {\n join\n}", wantErr: "wrong argument count"},
		{name: "replicas not a number", input: "circle {\n replicas two\n}", wantErr: "positive integer"},
		{name: "replicas zero", input: "circle {\n replicas 0\n}", wantErr: "positive integer"},
		{name: "replicas two values", input: "circle {\n replicas 2 3\n}", wantErr: "wrong argument count"},
		{name: "max_clock_skew days", input: "circle {\n max_clock_skew 1d\n}", want: App{MaxClockSkew: caddy.Duration(24 * time.Hour)}},
		{name: "max_clock_skew not a duration", input: "circle {\n max_clock_skew soon\n}", wantErr: "positive duration"},
		{name: "max_clock_skew zero", input: "circle {\n max_clock_skew 0s\n}", wantErr: "positive duration"},
		{name: "max_clock_skew negative", input: "circle {\n max_clock_skew -1m\n}", wantErr: "positive duration"},
		{name: "max_clock_skew missing", input: "circle {\n max_clock_skew\n}", wantErr: "wrong argument count"},
		{name: "max_clock_skew two values", input: "circle {\n max_clock_skew 1m 2m\n}", wantErr: "wrong argument count"},
		{name: "literal secret refused", input: "circle {\n secret c2VjcmV0LXZhbHVlLWRvLW5vdC1wcmludA==\n}", wantErr: "placeholder"},
		{name: "other placeholder refused", input: "circle {\n secret {http.request.header.X}\n}", wantErr: "placeholder"},
		{name: "secret and secret_file", input: "circle {\n secret {env.S}\n secret_file /s\n}", wantErr: "not both"},
		{name: "nested block", input: "circle {\n name a {\n x\n }\n}", wantErr: "unrecognized subdirective"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseGlobalCircle(caddyfile.NewTestDispenser(tc.input), nil)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
				}
				if strings.Contains(err.Error(), "c2VjcmV0") {
					t.Fatalf("error echoes the secret: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			app, ok := got.(httpcaddyfile.App)
			if !ok || app.Name != "circle" {
				t.Fatalf("got %#v, want an httpcaddyfile.App named circle", got)
			}
			var decoded App
			if err := json.Unmarshal(app.Value, &decoded); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(decoded, tc.want) {
				t.Fatalf("got %+v\nwant %+v", decoded, tc.want)
			}
		})
	}
}

func TestGlobalCircleOnlyOnce(t *testing.T) {
	_, err := parseGlobalCircle(caddyfile.NewTestDispenser("circle {\n}"), httpcaddyfile.App{Name: "circle"})
	if err == nil {
		t.Fatal("a second circle option was accepted")
	}
}

func TestUnmarshalStorage(t *testing.T) {
	for _, tc := range []struct {
		input   string
		wantErr bool
	}{
		{"circle", false},
		{"circle {\n}", false},
		{"circle extra", true},
		{"circle {\n lock_ttl 1m\n}", true},
	} {
		var s Storage
		err := s.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
		if (err != nil) != tc.wantErr {
			t.Errorf("%q: error %v, want error %v", tc.input, err, tc.wantErr)
		}
	}
}

func TestIsPlaceholder(t *testing.T) {
	for s, want := range map[string]bool{
		"{env.X}":          true,
		"{file./a/b}":      true,
		"{env.X}{env.Y}":   false,
		"prefix{env.X}":    false,
		"{http.vars.x}":    false,
		"plain":            false,
		"{}":               false,
		"{env.X} trailing": false,
	} {
		if got := isPlaceholder(s); got != want {
			t.Errorf("isPlaceholder(%q) = %v, want %v", s, got, want)
		}
	}
}

func TestDecodeSecret(t *testing.T) {
	good := newSecret()
	if b, err := decodeSecret(good + "\n"); err != nil || len(b) != 32 {
		t.Fatalf("decodeSecret(new secret): %d bytes, %v", len(b), err)
	}
	for _, bad := range []string{"", "not base64 !!", "c2hvcnQ="} {
		if _, err := decodeSecret(bad); err == nil {
			t.Errorf("decodeSecret(%q) accepted", bad)
		} else if bad != "" && strings.Contains(err.Error(), bad) {
			t.Errorf("error echoes the input: %v", err)
		}
	}
}
