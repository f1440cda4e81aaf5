using Akka.Actor;

namespace ActorVmm.Host.Control;

/// <summary>
/// What a host process answers to `actorvmm ctl`: its directory of VMs, at /user/vmm.
/// Everything else ctl does goes straight to the VM's actors (pause, stop, registers, stats).
/// </summary>
public static class ControlProtocol
{
    public const string DirectoryName = "vmm";

    public interface IControlMessage;

    /// <param name="Trace">the VM's trace hub (see TraceProtocol), or Nobody when it is not traced</param>
    /// <param name="Vm">the VM's name</param>
    /// <param name="Actor">the VM actor</param>
    public sealed record Register(string Vm, IActorRef Actor, IActorRef Trace) : IControlMessage
    {
        /// <summary>The VM's console hub (ConsoleProtocol), or Nobody.</summary>
        public IActorRef Console { get; init; } = ActorRefs.Nobody;
    }

    /// <summary>The VMs of a host; a host node answers with every VM of its cluster.</summary>
    public sealed record ListVms : IControlMessage { public static readonly ListVms Instance = new(); }

    /// <param name="Name">the VM's name (unique in its cluster)</param>
    /// <param name="Actor">the VM actor (Nobody once the VM ended)</param>
    /// <param name="Trace">its trace hub, or Nobody</param>
    /// <param name="Console">its console hub (ConsoleProtocol), or Nobody</param>
    /// <param name="Node">the host it runs on: its control address HOST:PORT</param>
    /// <param name="Ended">how it ended (a host node keeps ended VMs listed), or "" while it exists</param>
    public sealed record VmEntry(string Name, IActorRef Actor, IActorRef Trace, IActorRef Console, string Node, string Ended)
    {
        /// <summary>How it came to run where it does, if not by `ctl run` there: e.g. started again from
        /// a checkpoint after its node died.</summary>
        public string Origin { get; init; } = "";
    }

    public sealed record VmList(string Host, int Pid, IReadOnlyList<VmEntry> Vms) : IControlMessage;

    public static Props DirectoryProps(string host) => Props.Create(() => new VmmDirectoryActor(host));
}

/// <summary>The VMs of this host process, by name; a VM leaves the list when its actor stops.</summary>
internal sealed class VmmDirectoryActor : ReceiveActor
{
    private readonly Dictionary<string, (IActorRef Vm, IActorRef Trace, IActorRef Console)> _vms = new(StringComparer.Ordinal);

    public VmmDirectoryActor(string host)
    {
        Receive<ControlProtocol.Register>(r =>
        {
            _vms[r.Vm] = (r.Actor, r.Trace, r.Console);
            Context.Watch(r.Actor);
        });
        Receive<Terminated>(t =>
        {
            foreach (var name in _vms.Where(kv => kv.Value.Vm.Equals(t.ActorRef)).Select(kv => kv.Key).ToList()) _vms.Remove(name);
        });
        Receive<ControlProtocol.ListVms>(_ => Sender.Tell(new ControlProtocol.VmList(host, Environment.ProcessId,
            _vms.Select(kv => new ControlProtocol.VmEntry(kv.Key, kv.Value.Vm, kv.Value.Trace, kv.Value.Console, host, "")).OrderBy(v => v.Name).ToArray())));
    }
}
