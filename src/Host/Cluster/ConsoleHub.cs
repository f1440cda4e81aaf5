using Akka.Actor;
using ActorVmm.Devices;

namespace ActorVmm.Host.Cluster;

/// <summary>
/// `ctl console`: a VM's serial console offered to clients on any node. The hub keeps the latest
/// <see cref="ConsoleHubActor.HistoryLimit"/> bytes of output, sends them to a client that attaches,
/// then (with Follow) every new chunk; a client's input goes to the VM's UART as host input.
/// </summary>
public static class ConsoleProtocol
{
    public interface IConsoleMessage;

    /// <summary>Largest chunk of output in one message: well under remoting's frame size (128 000 bytes).</summary>
    public const int MaxChunk = 32 * 1024;

    /// <summary>Output of the guest (from the VM's serial console, local).</summary>
    public sealed record Output(byte[] Bytes) : IConsoleMessage;

    /// <summary>The VM whose UART (its child "uart0") input goes to (local wiring, once the VM exists); with
    /// <paramref name="VirtioConsole"/>, its virtio console (child "virtio-console") gets the same input.</summary>
    public sealed record Connect(IActorRef Vm, bool VirtioConsole = false) : IConsoleMessage;

    /// <summary>The VM ended: followers get <see cref="Chunk"/> with Ended set; history stays readable.</summary>
    public sealed record VmEnded(string Detail) : IConsoleMessage;

    /// <summary>
    /// A client asks for the output kept so far; with <paramref name="Follow"/> also for every chunk
    /// after it, sent to <paramref name="Client"/> until it detaches or stops.
    /// </summary>
    public sealed record Attach(IActorRef Client, bool Follow) : IConsoleMessage;

    public sealed record Detach(IActorRef Client) : IConsoleMessage;

    /// <summary>Output from byte <paramref name="Offset"/> of everything the guest wrote (earlier bytes may
    /// no longer be kept: <paramref name="Offset"/> says where this starts). <paramref name="Ended"/>: the VM
    /// ended (with <paramref name="Detail"/>) and no more output comes.</summary>
    public sealed record Chunk(string Vm, long Offset, byte[] Bytes, bool Ended, string Detail) : IConsoleMessage;

    /// <summary>The answer to <see cref="Attach"/>: the output kept (at most <see cref="ConsoleHubActor.HistoryLimit"/>
    /// bytes, from byte <paramref name="Offset"/>), and whether the VM has ended.</summary>
    public sealed record History(string Vm, long Offset, byte[] Bytes, bool Ended, string Detail) : IConsoleMessage;

    /// <summary>Bytes typed by a client, for the guest's UART receive side.</summary>
    public sealed record Input(byte[] Bytes) : IConsoleMessage;

    /// <summary>Asks for <see cref="State"/>: everything written so far and the bytes kept, so that a hub on
    /// another node can go on where this one stops (a migration).</summary>
    public sealed record GetState : IConsoleMessage { public static readonly GetState Instance = new(); }

    /// <param name="Written">bytes the guest wrote since the VM started</param>
    /// <param name="Kept">the last of them (at most <see cref="ConsoleHubActor.HistoryLimit"/>)</param>
    public sealed record State(long Written, byte[] Kept) : IConsoleMessage;

    /// <summary>The VM now runs elsewhere and <paramref name="Hub"/> (on <paramref name="Node"/>) is its
    /// console: this hub follows it and passes its output on to its own followers, from the byte it
    /// stopped at, and sends them its end; input typed here goes there.</summary>
    public sealed record MovedTo(IActorRef Hub, string Node) : IConsoleMessage;

    public static Props Props(string vm) => Akka.Actor.Props.Create(() => new ConsoleHubActor(vm, 0, Array.Empty<byte>()));

    /// <summary>A hub that goes on from <paramref name="from"/>: its offset and history continue
    /// another's (the VM came from another node).</summary>
    public static Props Props(string vm, State from) => Akka.Actor.Props.Create(() => new ConsoleHubActor(vm, from.Written, from.Kept));
}

public sealed class ConsoleHubActor : ReceiveActor
{
    /// <summary>Output kept for clients that attach later (one <see cref="ConsoleProtocol.History"/> message).</summary>
    public const int HistoryLimit = 64 * 1024;

    private readonly string _vm;
    private readonly LinkedList<byte[]> _history = new();
    private readonly HashSet<IActorRef> _followers = [];
    private long _historyBytes;
    private long _written; // bytes of output since the VM started
    private ActorSelection[] _inputs = [];
    private string? _ended;

    private IActorRef? _movedTo;

    public ConsoleHubActor(string vm, long written, byte[] kept)
    {
        _vm = vm;
        _written = written - Math.Min(kept.Length, HistoryLimit);
        Append(kept.Length > HistoryLimit ? kept[^HistoryLimit..] : kept);
        Receive<ConsoleProtocol.Output>(o => Append(o.Bytes));
        Receive<ConsoleProtocol.GetState>(_ => Sender.Tell(new ConsoleProtocol.State(_written, Kept())));
        Receive<ConsoleProtocol.MovedTo>(m =>
        {
            _movedTo = m.Hub;
            _inputs = [];
            if (StopIfUnfollowed()) return;
            Context.Watch(m.Hub);
            m.Hub.Tell(new ConsoleProtocol.Attach(Self, Follow: true));
        });
        // From the hub the VM moved to: only the bytes past what this hub has are new.
        Receive<ConsoleProtocol.History>(h => Relay(h.Offset, h.Bytes, h.Ended, h.Detail), _ => _movedTo is not null && Sender.Equals(_movedTo));
        Receive<ConsoleProtocol.Chunk>(c => Relay(c.Offset, c.Bytes, c.Ended, c.Detail), _ => _movedTo is not null && Sender.Equals(_movedTo));
        Receive<ConsoleProtocol.Connect>(c => _inputs = c.VirtioConsole
            ? [Context.ActorSelection(c.Vm.Path / "uart0"), Context.ActorSelection(c.Vm.Path / Vm.PcPlatform.VirtioConsoleName)]
            : [Context.ActorSelection(c.Vm.Path / "uart0")]);
        Receive<ConsoleProtocol.VmEnded>(e =>
        {
            _ended = e.Detail;
            foreach (var f in _followers) f.Tell(new ConsoleProtocol.Chunk(_vm, _written, [], true, e.Detail));
            foreach (var f in _followers) Context.Unwatch(f);
            _followers.Clear();
            _inputs = [];
            if (_movedTo is not null) Context.Stop(Self); // a relay: the hub it followed keeps the history
        });
        Receive<ConsoleProtocol.Attach>(a =>
        {
            a.Client.Tell(new ConsoleProtocol.History(_vm, _written - _historyBytes, Kept(), _ended is not null, _ended ?? ""));
            if (!a.Follow || _ended is not null) return;
            _followers.Add(a.Client);
            Context.Watch(a.Client);
        });
        Receive<ConsoleProtocol.Detach>(d =>
        {
            _followers.Remove(d.Client);
            Context.Unwatch(d.Client);
            StopIfUnfollowed();
        });
        Receive<Terminated>(t =>
        {
            if (_movedTo is not null && t.ActorRef.Equals(_movedTo) && _ended is null)
                Self.Tell(new ConsoleProtocol.VmEnded("its console on the node it moved to went away (that node left or stopped)"));
            _followers.Remove(t.ActorRef);
            StopIfUnfollowed();
        });
        Receive<ConsoleProtocol.Input>(i =>
        {
            // Bounded as the UART's own receive path is: a client cannot queue unbounded input.
            if (i.Bytes.Length is not (> 0 and <= ConsoleProtocol.MaxChunk)) return;
            if (_movedTo is not null) _movedTo.Tell(i);
            foreach (var input in _inputs) input.Tell(new DeviceProtocol.HostInput(i.Bytes));
        });
    }

    /// <summary>A relay (its VM moved) that no client follows any more has nothing to do: it stops, and a
    /// client that comes later finds the VM's console where the VM runs (ctl list).</summary>
    private bool StopIfUnfollowed()
    {
        if (_movedTo is null || _followers.Count > 0) return false;
        Context.Stop(Self);
        return true;
    }

    private void Append(byte[] bytes)
    {
        foreach (var part in Split(bytes))
        {
            var chunk = new ConsoleProtocol.Chunk(_vm, _written, part, false, "");
            _written += part.Length;
            Keep(part);
            foreach (var f in _followers) f.Tell(chunk);
        }
    }

    /// <summary>Output of the hub followed after a move, at byte <paramref name="offset"/>: what this hub
    /// does not have yet is taken as its own; an end is passed on.</summary>
    private void Relay(long offset, byte[] bytes, bool ended, string detail)
    {
        if (offset > _written)
        {
            // Bytes the other hub no longer kept when this one attached: lost to this hub's followers.
            Serilog.Log.Warning("console of {Vm}: {Bytes} byte(s) of output from the node it moved to were no longer kept", _vm, offset - _written);
            _written = offset;
        }
        var skip = _written - offset;
        if (skip < bytes.Length) Append(skip == 0 ? bytes : bytes[(int)skip..]);
        if (ended) Self.Tell(new ConsoleProtocol.VmEnded(detail));
    }

    private byte[] Kept()
    {
        var kept = new byte[_historyBytes];
        var at = 0;
        foreach (var part in _history)
        {
            part.CopyTo(kept, at);
            at += part.Length;
        }
        return kept;
    }

    private static IEnumerable<byte[]> Split(byte[] bytes)
    {
        for (var i = 0; i < bytes.Length; i += ConsoleProtocol.MaxChunk)
            yield return bytes.AsSpan(i, Math.Min(ConsoleProtocol.MaxChunk, bytes.Length - i)).ToArray();
    }

    private void Keep(byte[] part)
    {
        _history.AddLast(part);
        _historyBytes += part.Length;
        while (_historyBytes > HistoryLimit && _history.First is { } first)
        {
            _history.RemoveFirst();
            _historyBytes -= first.Value.Length;
        }
    }
}
