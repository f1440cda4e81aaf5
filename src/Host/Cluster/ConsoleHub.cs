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

    public static Props Props(string vm) => Akka.Actor.Props.Create(() => new ConsoleHubActor(vm));
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

    public ConsoleHubActor(string vm)
    {
        _vm = vm;
        Receive<ConsoleProtocol.Output>(o =>
        {
            foreach (var part in Split(o.Bytes))
            {
                var chunk = new ConsoleProtocol.Chunk(_vm, _written, part, false, "");
                _written += part.Length;
                Keep(part);
                foreach (var f in _followers) f.Tell(chunk);
            }
        });
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
        });
        Receive<ConsoleProtocol.Attach>(a =>
        {
            var kept = new byte[_historyBytes];
            var at = 0;
            foreach (var part in _history)
            {
                part.CopyTo(kept, at);
                at += part.Length;
            }
            a.Client.Tell(new ConsoleProtocol.History(_vm, _written - _historyBytes, kept, _ended is not null, _ended ?? ""));
            if (!a.Follow || _ended is not null) return;
            _followers.Add(a.Client);
            Context.Watch(a.Client);
        });
        Receive<ConsoleProtocol.Detach>(d =>
        {
            _followers.Remove(d.Client);
            Context.Unwatch(d.Client);
        });
        Receive<Terminated>(t => _followers.Remove(t.ActorRef));
        Receive<ConsoleProtocol.Input>(i =>
        {
            // Bounded as the UART's own receive path is: a client cannot queue unbounded input.
            if (i.Bytes.Length is not (> 0 and <= ConsoleProtocol.MaxChunk)) return;
            foreach (var input in _inputs) input.Tell(new DeviceProtocol.HostInput(i.Bytes));
        });
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
