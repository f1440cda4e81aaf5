using Akka.Actor;

namespace ActorVmm.Host.Cluster;

/// <summary>
/// A host node's VMs (its actor at /user/vmm, <see cref="NodeActor"/>) and where a new VM goes (the
/// placement singleton, <see cref="PlacementActor"/>). `ctl run` sends <see cref="RunVm"/> to any node;
/// the node passes it to the singleton, which picks the node (or checks the one asked for), checks
/// the name is free in the whole cluster, and has that node start the VM.
/// </summary>
public static class NodeProtocol
{
    public interface INodeMessage;

    /// <summary>One actorvmm.vm setting ("actorvmm.vm.memory" = "64M"): what `run`'s options become.</summary>
    public sealed record Setting(string Key, string Value);

    /// <summary>Start VM <paramref name="Name"/> from <paramref name="Settings"/> on node <paramref name="Node"/>
    /// (HOST:PORT), or on the one the placement policy picks when it is empty. Answered with
    /// <see cref="VmStarted"/> or <see cref="RunRefused"/>.</summary>
    public sealed record RunVm(string Name, Setting[] Settings, string Node) : INodeMessage;

    public sealed record VmStarted(string Name, string Node) : INodeMessage;

    public sealed record RunRefused(string Name, string Why) : INodeMessage;

    /// <summary>From the placement singleton to the chosen node: build and start the VM here.</summary>
    public sealed record StartVm(string Name, Setting[] Settings) : INodeMessage;

    /// <summary>What a node has committed to VMs, for placement.</summary>
    public sealed record GetLoad : INodeMessage { public static readonly GetLoad Instance = new(); }

    /// <param name="Node">HOST:PORT</param>
    /// <param name="Vcpus">vcpus of the VMs it runs or is starting</param>
    /// <param name="MemoryBytes">their guest RAM</param>
    /// <param name="Names">the names it holds (running, starting or ended and still listed)</param>
    /// <param name="HostCpus">the host's processors</param>
    /// <param name="HostMemoryBytes">the host's RAM</param>
    public sealed record Load(string Node, int Vcpus, long MemoryBytes, string[] Names, int HostCpus, long HostMemoryBytes) : INodeMessage;

    /// <summary>The VMs of this node only (a node answers <see cref="Control.ControlProtocol.ListVms"/> with
    /// the cluster's, gathered with this).</summary>
    public sealed record ListLocal : INodeMessage { public static readonly ListLocal Instance = new(); }

    public sealed record LocalVms(string Node, Control.ControlProtocol.VmEntry[] Vms) : INodeMessage;

    /// <summary>The cluster's members as this node sees them (`ctl nodes`).</summary>
    public sealed record ListNodes : INodeMessage { public static readonly ListNodes Instance = new(); }

    /// <param name="Node">HOST:PORT</param>
    /// <param name="Status">Akka's member status: Joining, Up, Leaving, Exiting, Down, Removed ...</param>
    /// <param name="Reachable">whether this node's failure detector reaches it</param>
    /// <param name="Roles">its cluster roles</param>
    public sealed record Member(string Node, string Status, bool Reachable, string[] Roles);

    /// <param name="Self">the answering node</param>
    /// <param name="Leader">the cluster leader as this node sees it</param>
    public sealed record Members(string Self, string Leader, Member[] Nodes) : INodeMessage;

    /// <summary>HOST:PORT of a node's address.</summary>
    public static string NodeName(Address address) => $"{address.Host}:{address.Port}";
}
