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

    public sealed record Register(string Vm, IActorRef Actor) : IControlMessage;

    public sealed record ListVms : IControlMessage { public static readonly ListVms Instance = new(); }

    public sealed record VmEntry(string Name, IActorRef Actor);

    public sealed record VmList(string Host, int Pid, IReadOnlyList<VmEntry> Vms) : IControlMessage;

    public static Props DirectoryProps(string host) => Props.Create(() => new VmmDirectoryActor(host));
}

/// <summary>The VMs of this host process, by name; a VM leaves the list when its actor stops.</summary>
internal sealed class VmmDirectoryActor : ReceiveActor
{
    private readonly Dictionary<string, IActorRef> _vms = new(StringComparer.Ordinal);

    public VmmDirectoryActor(string host)
    {
        Receive<ControlProtocol.Register>(r =>
        {
            _vms[r.Vm] = r.Actor;
            Context.Watch(r.Actor);
        });
        Receive<Terminated>(t =>
        {
            foreach (var name in _vms.Where(kv => kv.Value.Equals(t.ActorRef)).Select(kv => kv.Key).ToList()) _vms.Remove(name);
        });
        Receive<ControlProtocol.ListVms>(_ => Sender.Tell(new ControlProtocol.VmList(host, Environment.ProcessId,
            _vms.Select(kv => new ControlProtocol.VmEntry(kv.Key, kv.Value)).OrderBy(v => v.Name).ToArray())));
    }
}
