// Command cells-proxy is the TLS front for a Pydio Cells server: one port
// for the web UI, REST, S3, WebDAV, websockets and the gRPC of Cells Sync,
// configured only by environment variables.
//
// Usage:
//
//	cells-proxy              serve (configured by the environment)
//	cells-proxy healthcheck  ask the running proxy whether it and Cells are ready
//	cells-proxy env          list the environment variables
//	cells-proxy version      print the version
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"
	"text/tabwriter"

	"github.com/cells-proxy/cells-proxy/proxy"
)

// version is set at build time: -ldflags "-X main.version=v1.2.3".
var version = "dev"

// errUsage marks a configuration or usage problem: exit status 2.
var errUsage = errors.New("usage")

// errUnhealthy marks a failed healthcheck: exit status 1, its line printed.
var errUnhealthy = errors.New("unhealthy")

func main() {
	err := run(context.Background(), os.Args[1:], os.Stdout, os.Stderr)
	switch {
	case err == nil:
	case errors.Is(err, errUsage):
		os.Exit(2)
	default:
		// A healthcheck's line is printed, a cut drain logged.
		if !errors.Is(err, errUnhealthy) && !errors.Is(err, proxy.ErrCut) {
			for line := range strings.SplitSeq(err.Error(), "\n") {
				fmt.Fprintln(os.Stderr, "cells-proxy:", line)
			}
		}
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cmd := ""
	if len(args) > 0 {
		cmd = args[0]
	}
	switch cmd {
	case "", "serve":
		return serve(ctx, stderr)
	case "healthcheck":
		return healthcheck(ctx, stdout, stderr)
	case "env":
		printEnv(stdout)
		return nil
	case "version", "-version", "--version":
		fmt.Fprintln(stdout, "cells-proxy", version)
		return nil
	case "help", "-h", "-help", "--help":
		usage(stdout)
		return nil
	}
	fmt.Fprintf(stderr, "cells-proxy: unknown command %q\n", cmd)
	usage(stderr)
	return errUsage
}

func usage(w io.Writer) {
	fmt.Fprint(w, `usage: cells-proxy [serve|healthcheck|env|version]
cells-proxy is configured by environment variables: run "cells-proxy env" to list them.
`)
}

// loadConfig prints every configuration problem, one a line.
func loadConfig(stderr io.Writer) (*proxy.Config, error) {
	cfg, err := proxy.Load()
	if err != nil {
		return nil, configProblems(stderr, err)
	}
	return cfg, nil
}

// configProblems prints err's lines, one problem each, and returns errUsage.
func configProblems(stderr io.Writer, err error) error {
	for line := range strings.SplitSeq(err.Error(), "\n") {
		fmt.Fprintln(stderr, "cells-proxy: config:", line)
	}
	return errUsage
}

func serve(ctx context.Context, stderr io.Writer) error {
	// certbot and cert-manager renewals are picked up by polling; SIGHUP
	// forces a reload now (a deploy hook: docker kill -s HUP). Caught
	// from the start: one that arrives while the certificate is first
	// read is a reload once serving, not SIGHUP's default, the end.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	cfg, err := proxy.Load()
	if err != nil {
		// Every problem at once: the files too, not after the next start.
		return configProblems(stderr, errors.Join(err, proxy.CheckFiles()))
	}
	log := newLogger(cfg, stderr)
	// What net/http's Transport writes with the log package (an answer
	// Cells sent on an idle connection, with its first bytes) goes
	// through the same handler: one format on stderr, at warn.
	slog.SetLogLoggerLevel(slog.LevelWarn)
	slog.SetDefault(log)
	limitMemory(log)
	// docker stop sends SIGTERM: drain instead of dying mid-upload. A
	// second SIGTERM or SIGINT (Ctrl-C twice) cuts the drain short.
	stopping := make(chan os.Signal, 2)
	signal.Notify(stopping, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(stopping)
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	s, err := proxy.New(cfg, log)
	if fe := (*proxy.FileError)(nil); errors.As(err, &fe) {
		return configProblems(stderr, fe)
	}
	if err != nil {
		return err
	}
	done := make(chan struct{})
	defer close(done)
	go func() {
		select {
		case <-stopping:
			stop()
		case <-ctx.Done():
		}
		select {
		case sig := <-stopping:
			log.Warn("second signal: cutting the drain short", "signal", sig.String())
			s.Cut()
		case <-done:
		}
	}()
	go func() {
		for {
			select {
			case <-hup:
				s.Reload() // logs its outcome
			case <-ctx.Done():
				return
			}
		}
	}()
	log.Info("starting", "version", version)
	return s.Run(ctx)
}

// limitMemory gives the garbage collector 90% of the container's memory
// limit (proxy.MemoryLimit says why), leaving the rest to what it does not
// count: the binary's pages, the kernel's socket buffers. GOMEMLIMIT, when
// set, is the operator's word, and "off" among them.
func limitMemory(log *slog.Logger) {
	if os.Getenv("GOMEMLIMIT") != "" {
		return
	}
	limit := proxy.MemoryLimit("/")
	if limit <= 0 {
		return
	}
	soft := limit - limit/10
	debug.SetMemoryLimit(soft)
	log.Info("memory limit", "cgroup", limit, "gomemlimit", soft)
}

func newLogger(cfg *proxy.Config, w io.Writer) *slog.Logger {
	opts := &slog.HandlerOptions{Level: cfg.LogLevel}
	if cfg.LogFormat == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}

func healthcheck(ctx context.Context, stdout, stderr io.Writer) error {
	cfg, err := loadConfig(stderr)
	if err != nil {
		return err
	}
	msg, err := proxy.Probe(ctx, cfg.HealthAddr)
	if err != nil {
		fmt.Fprintln(stdout, "unhealthy:", err)
		return errUnhealthy
	}
	fmt.Fprintln(stdout, "healthy:", msg)
	return nil
}

func printEnv(w io.Writer) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "VARIABLE\tDEFAULT\tMEANING")
	for _, v := range proxy.Variables() {
		def := v.Default
		if def == "" {
			def = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", v.Name, def, v.Desc)
	}
	tw.Flush()
}
