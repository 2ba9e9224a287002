// cri-client is a minimal CRI client built on grpc-go, used by hoist's
// compatibility test (e2e/cri_compat.rs). It connects the way kubelet and
// crictl 1.26-1.30 do: the bare unix socket path is the dial target and a
// custom dialer opens it, so grpc-go sends that path as the HTTP/2
// :authority of every request.
//
// Usage: cri-client SOCKET_PATH
//
// Each stdin line is "<full method> <base64 request>", for example
// "/runtime.v1.ImageService/ImageFsInfo <b64>". The requests are already
// protobuf-encoded; they are sent in order over one connection, and each
// gets one stdout line: "OK <base64 response>" or "ERR <code> <message>".
// Every dial is reported on stderr as "dial <address>".
package main

import (
	"bufio"
	"context"
	"encoding/base64"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

// rawCodec passes already-encoded protobuf messages through unchanged. Its
// name is "proto", so the content-type stays application/grpc+proto.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) {
	b, ok := v.(*[]byte)
	if !ok {
		return nil, fmt.Errorf("rawCodec: cannot marshal %T", v)
	}
	return *b, nil
}

func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	b, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("rawCodec: cannot unmarshal into %T", v)
	}
	*b = append([]byte(nil), data...)
	return nil
}

func (rawCodec) Name() string { return "proto" }

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: cri-client SOCKET_PATH")
		os.Exit(2)
	}
	target := os.Args[1]

	// As kubelet 1.26 did: the target is the path itself, and the dialer
	// opens it as a unix socket.
	dialer := func(ctx context.Context, addr string) (net.Conn, error) {
		fmt.Fprintf(os.Stderr, "dial %s\n", addr)
		if addr != target {
			return nil, fmt.Errorf("dialer got %q, not the target %q", addr, target)
		}
		var d net.Dialer
		return d.DialContext(ctx, "unix", addr)
	}
	conn, err := grpc.Dial(target,
		grpc.WithInsecure(),
		grpc.WithContextDialer(dialer),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{})),
	)
	if err != nil {
		fmt.Fprintf(os.Stderr, "dial %s: %v\n", target, err)
		os.Exit(1)
	}
	defer conn.Close()

	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 16<<20)
	out := bufio.NewWriter(os.Stdout)
	for in.Scan() {
		line := strings.TrimSpace(in.Text())
		if line == "" {
			continue
		}
		fields := strings.Fields(line)
		if len(fields) > 2 {
			fmt.Fprintf(os.Stderr, "bad input line: %q\n", line)
			os.Exit(2)
		}
		var req []byte
		if len(fields) == 2 {
			if req, err = base64.StdEncoding.DecodeString(fields[1]); err != nil {
				fmt.Fprintf(os.Stderr, "bad base64 in %q: %v\n", line, err)
				os.Exit(2)
			}
		}
		var resp []byte
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		callErr := conn.Invoke(ctx, fields[0], &req, &resp)
		cancel()
		if callErr != nil {
			s := status.Convert(callErr)
			msg := strings.Join(strings.Fields(s.Message()), " ")
			fmt.Fprintf(out, "ERR %s %s\n", s.Code(), msg)
		} else {
			fmt.Fprintf(out, "OK %s\n", base64.StdEncoding.EncodeToString(resp))
		}
		if err := out.Flush(); err != nil {
			fmt.Fprintf(os.Stderr, "writing stdout: %v\n", err)
			os.Exit(1)
		}
	}
	if err := in.Err(); err != nil {
		fmt.Fprintf(os.Stderr, "reading stdin: %v\n", err)
		os.Exit(1)
	}
}
