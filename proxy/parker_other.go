//go:build !linux

package proxy

import "log/slog"

// parker: elsewhere than on Linux, idle websocket pumps wait inside their
// reads, a goroutine each.
type parker struct{}

func getParker(*slog.Logger) *parker { return nil }

func (*parker) park(*pump) bool   { return false }
func (*parker) unpark(*pump) bool { return false }
