package main

// verifyPHC lets the control API's account probe tell which password an
// account record's hash matches (the node assembly itself is
// caddymodule/circlenode's, opened in main.go).

import (
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"strconv"
	"strings"

	"golang.org/x/crypto/argon2"
)

// verifyPHC checks pw against an argon2id PHC string
// ($argon2id$v=19$m=<KiB>,t=<n>,p=<n>$<salt>$<hash>).
func verifyPHC(pw, phc string) (bool, error) {
	f := strings.Split(phc, "$")
	if len(f) != 6 || f[1] != "argon2id" {
		return false, errors.New("not an argon2id PHC string")
	}
	var m, t, p uint64
	for _, kv := range strings.Split(f[3], ",") {
		k, v, _ := strings.Cut(kv, "=")
		x, err := strconv.ParseUint(v, 10, 32)
		if err != nil {
			return false, err
		}
		switch k {
		case "m":
			m = x
		case "t":
			t = x
		case "p":
			p = x
		}
	}
	salt, err := base64.RawStdEncoding.DecodeString(f[4])
	if err != nil {
		return false, err
	}
	want, err := base64.RawStdEncoding.DecodeString(f[5])
	if err != nil {
		return false, err
	}
	if m == 0 || t == 0 || p == 0 || p > 255 || m > 1<<20 {
		return false, errors.New("bad argon2 parameters")
	}
	got := argon2.IDKey([]byte(pw), salt, uint32(t), uint32(m), uint8(p), uint32(len(want)))
	return subtle.ConstantTimeCompare(got, want) == 1, nil
}
