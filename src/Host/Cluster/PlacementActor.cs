using Akka.Actor;
using Akka.Cluster;
using Akka.Cluster.Tools.Singleton;
using ActorVmm.Host.Control;

namespace ActorVmm.Host.Cluster;

/// <summary>
/// Where a new VM runs: one instance in the cluster (an Akka cluster singleton on the oldest node),
/// so two `ctl run`s for the same name cannot both succeed. It keeps no state of its own: for each
/// request it asks every Up member for its load (<see cref="NodeProtocol.GetLoad"/>), refuses a name
/// some node holds, picks the node asked for or the least loaded one, has it start the VM and
/// answers the client, one request at a time. A singleton that moves (its node left or died)
/// therefore loses nothing but the request in progress, whose client sees no answer.
/// </summary>
public sealed class PlacementActor : ReceiveActor, IWithStash
{
    public const string ManagerName = "placement";
    public const string ProxyName = "placement-proxy";

    /// <summary>How long a node may take to build and start a VM (KVM set-up, loading the image).</summary>
    public static readonly TimeSpan StartLimit = TimeSpan.FromMinutes(5);

    /// <summary>How long a reachable node may take to report its load: generous, because the first message
    /// between two nodes builds their serializers (seconds on a slow or emulated machine).</summary>
    private static readonly TimeSpan LoadLimit = TimeSpan.FromSeconds(30);

    private sealed record Decided(object Answer, IActorRef Client);

    public IStash Stash { get; set; } = null!;

    /// <summary>The singleton's manager (start one on every node) and the proxy that reaches it.</summary>
    public static (Props Manager, Props Proxy) Props(ActorSystem system) =>
        (ClusterSingletonManager.Props(Akka.Actor.Props.Create(() => new PlacementActor()), PoisonPill.Instance,
                ClusterSingletonManagerSettings.Create(system)),
            ClusterSingletonProxy.Props($"/user/{ManagerName}", ClusterSingletonProxySettings.Create(system)));

    public PlacementActor() => Idle();

    private void Idle()
    {
        Receive<NodeProtocol.RunVm>(run =>
        {
            var client = Sender;
            Become(Busy);
            Place(run).ContinueWith(t => new Decided(
                    t.IsCompletedSuccessfully ? t.Result : new NodeProtocol.RunRefused(run.Name, t.Exception?.GetBaseException().Message ?? "placement failed"),
                    client), TaskContinuationOptions.ExecuteSynchronously)
                .PipeTo(Self);
        });
    }

    private void Busy()
    {
        Receive<Decided>(d =>
        {
            d.Client.Tell(d.Answer);
            Stash.UnstashAll();
            Become(Idle);
        });
        ReceiveAny(_ => Stash.Stash());
    }

    private async Task<object> Place(NodeProtocol.RunVm run)
    {
        var cluster = Akka.Cluster.Cluster.Get(Context.System);
        var state = cluster.State;
        var members = state.Members.Where(m => m.Status == MemberStatus.Up && !state.Unreachable.Contains(m)).ToList();
        var system = Context.System;
        var loads = (await Task.WhenAll(members.Select(async m =>
        {
            try { return await NodeOf(system, m.Address).Ask<NodeProtocol.Load>(NodeProtocol.GetLoad.Instance, LoadLimit); }
            catch (Exception) { return null; }
        }))).OfType<NodeProtocol.Load>().ToList();
        if (loads.FirstOrDefault(l => l.Names.Contains(run.Name)) is { } holder)
            return new NodeProtocol.RunRefused(run.Name, $"a VM named {run.Name} is already on {holder.Node} (ctl list)");
        var choice = Choose(loads, run.Node);
        if (choice.Refusal is not null) return new NodeProtocol.RunRefused(run.Name, choice.Refusal);
        var address = members.First(m => NodeProtocol.NodeName(m.Address) == choice.Node).Address;
        try
        {
            return await NodeOf(system, address).Ask<object>(new NodeProtocol.StartVm(run.Name, run.Settings), StartLimit);
        }
        catch (Exception e) when (e is AskTimeoutException or TaskCanceledException)
        {
            return new NodeProtocol.RunRefused(run.Name, $"node {choice.Node} did not start the VM within {StartLimit.TotalMinutes:0} minutes");
        }
    }

    private static ActorSelection NodeOf(ActorSystem system, Address address) =>
        system.ActorSelection(new RootActorPath(address) / "user" / ControlProtocol.DirectoryName);

    /// <summary>
    /// The node for a new VM: <paramref name="wanted"/> if given (it must be an Up member that answered),
    /// else the least loaded: the smallest share of its processors and memory already given to VMs
    /// (vcpus / processors + guest RAM / host RAM), ties broken by address.
    /// </summary>
    public static (string? Node, string? Refusal) Choose(IReadOnlyList<NodeProtocol.Load> loads, string wanted)
    {
        if (loads.Count == 0) return (null, "no node of the cluster answered");
        if (wanted.Length > 0)
            return loads.Any(l => l.Node == wanted)
                ? (wanted, null)
                : (null, $"no node {wanted} in the cluster (nodes: {string.Join(", ", loads.Select(l => l.Node).Order())})");
        var best = loads.OrderBy(Share).ThenBy(l => l.Node, StringComparer.Ordinal).First();
        return (best.Node, null);
    }

    private static double Share(NodeProtocol.Load l) =>
        (double)l.Vcpus / Math.Max(1, l.HostCpus) + (double)l.MemoryBytes / Math.Max(1, l.HostMemoryBytes);
}
