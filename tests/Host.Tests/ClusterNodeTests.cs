using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using Akka.Actor;
using Akka.Cluster;
using ActorVmm.Host.Cluster;
using ActorVmm.Host.Config;
using ActorVmm.Host.Control;
using Xunit;

namespace ActorVmm.Host.Tests;

/// <summary>
/// Host nodes in an Akka.Cluster, without guests (those run in the Integration tests): several actor
/// systems in this process, and real `actorvmm host` processes on 127.0.0.1 that the tests start,
/// kill and stop. Membership, failure detection and downing are Akka.Cluster's; what is checked is
/// how ActorVmm uses them: cluster-wide names and lists, placement, the split-brain resolver's choice.
/// </summary>
public sealed class ClusterNodeTests : IAsyncLifetime
{
    private readonly string _dir = Directory.CreateTempSubdirectory("actorvmm-cluster-").FullName;
    private readonly List<ActorSystem> _systems = [];
    private readonly List<Process> _processes = [];

    public Task InitializeAsync() => Task.CompletedTask;

    public async Task DisposeAsync()
    {
        foreach (var p in _processes)
        {
            try { if (!p.HasExited) p.Kill(entireProcessTree: true); }
            catch (InvalidOperationException) { }
            p.Dispose();
        }
        await Task.WhenAll(_systems.Select(s => s.Terminate()));
        Directory.Delete(_dir, recursive: true);
    }

    private Akka.Configuration.Config NodeConfig(string strategy = "keep-oldest") => ConfigValues.From([
        new("actorvmm.control.directory", _dir),
        new("actorvmm.cluster.split-brain-resolver.strategy", strategy),
        new("actorvmm.cluster.split-brain-resolver.stable-after", "2s"),
    ]).WithFallback(VmConfig.Load(null));

    /// <summary>A host node in this process; the first one starts the cluster, the others join it.</summary>
    private (ActorSystem System, IActorRef Node) StartNode(Address? seed)
    {
        var config = NodeConfig();
        var system = HostRunner.CreateSystem(config, ControlClient.HostSystemName, cluster: true);
        _systems.Add(system);
        var node = HostNode.Start(system, config, seed is null ? [] : [seed]);
        return (system, node);
    }

    private static async Task UntilAsync(Func<bool> condition, TimeSpan limit, string what)
    {
        var deadline = DateTime.UtcNow + limit;
        while (!condition())
        {
            if (DateTime.UtcNow > deadline) Assert.Fail($"{what} within {limit.TotalSeconds:0} s");
            await Task.Delay(100);
        }
    }

    [Fact]
    public async Task Three_nodes_form_a_cluster_list_each_others_vms_and_refuse_a_name_held_elsewhere()
    {
        var (first, node1) = StartNode(null);
        var seed = Akka.Cluster.Cluster.Get(first).SelfAddress;
        var (second, node2) = StartNode(seed);
        var (third, node3) = StartNode(seed);
        await UntilAsync(() => _systems.All(s => Akka.Cluster.Cluster.Get(s).State.Members.Count(m => m.Status == MemberStatus.Up) == 3),
            TimeSpan.FromSeconds(60), "three nodes did not see each other Up");

        // VMs made by other means on nodes 2 and 3 (no KVM here): the node lists them as its own.
        node2.Tell(new ControlProtocol.Register("alpha", second.ActorOf(Props.Empty, "alpha-vm"), ActorRefs.Nobody));
        node3.Tell(new ControlProtocol.Register("beta", third.ActorOf(Props.Empty, "beta-vm"), ActorRefs.Nobody));

        await using var client = ControlClient.Create(TimeSpan.FromSeconds(10), _dir);
        var address1 = HostRunner.ControlAddress(first);
        ControlProtocol.VmList list = null!;
        await UntilAsync(() => (list = client.ListAsync(address1).GetAwaiter().GetResult()).Vms.Count == 2, TimeSpan.FromSeconds(20),
            "node 1 did not list the VMs of nodes 2 and 3");
        Assert.Equal(["alpha", "beta"], list.Vms.Select(v => v.Name));
        Assert.Equal(HostRunner.ControlAddress(second), list.Vms[0].Node);
        Assert.Equal(HostRunner.ControlAddress(third), list.Vms[1].Node);

        // A name held on node 2, asked for through node 1 (placement is one singleton for the cluster).
        var held = await Assert.ThrowsAsync<ControlException>(() => client.RunVmAsync(address1, "alpha", [new("actorvmm.vm.boot.flat", "/nonexistent")], null));
        Assert.Contains($"already on {HostRunner.ControlAddress(second)}", held.Message);
        // A node that is not a member.
        var unknown = await Assert.ThrowsAsync<ControlException>(() => client.RunVmAsync(address1, "gamma", [], "127.0.0.1:1"));
        Assert.Contains("no node 127.0.0.1:1 in the cluster", unknown.Message);
        // What the chosen node refuses before building anything: a setting that is not a VM's, a bad name.
        var foreign = await Assert.ThrowsAsync<ControlException>(() =>
            client.RunVmAsync(address1, "gamma", [new("akka.actor.provider", "local")], HostRunner.ControlAddress(third)));
        Assert.Contains("akka.actor.provider is not a VM setting", foreign.Message);
        var badName = await Assert.ThrowsAsync<ControlException>(() => client.RunVmAsync(address1, "a/b", [], HostRunner.ControlAddress(third)));
        Assert.Contains("cannot name a VM", badName.Message);
        // A VM that cannot be built is refused with the reason, and its name is free again.
        var missing = await Assert.ThrowsAsync<ControlException>(() =>
            client.RunVmAsync(address1, "gamma", [new("actorvmm.vm.boot.flat", Path.Combine(_dir, "missing.bin"))], HostRunner.ControlAddress(third)));
        Assert.Contains("does not exist", missing.Message);
        Assert.Equal(2, (await client.ListAsync(HostRunner.ControlAddress(third))).Vms.Count);

        var members = await client.NodesAsync(address1);
        Assert.Equal(3, members.Nodes.Count(m => m is { Status: "Up", Reachable: true }));
        GC.KeepAlive(node1);
    }

    [Fact]
    public void Placement_picks_the_node_asked_for_or_the_least_loaded()
    {
        NodeProtocol.Load Load(string node, int vcpus, long memory, int cpus = 4, long ram = 16L << 30) => new(node, vcpus, memory, [], cpus, ram);
        var loads = new[] { Load("a:1", 4, 1L << 30), Load("b:2", 1, 1L << 30), Load("c:3", 1, 8L << 30) };
        Assert.Equal(("b:2", (string?)null), PlacementActor.Choose(loads, ""));
        Assert.Equal(("c:3", (string?)null), PlacementActor.Choose(loads, "c:3"));
        Assert.Contains("no node d:4", PlacementActor.Choose(loads, "d:4").Refusal);
        Assert.Equal("no node of the cluster answered", PlacementActor.Choose([], "").Refusal);
        // A node with more processors takes the same vcpus for a smaller share of itself.
        Assert.Equal("big:1", PlacementActor.Choose([Load("small:2", 2, 0, cpus: 2), Load("big:1", 2, 0, cpus: 8)], "").Node);
        // Ties go to the lower address, so the choice does not depend on the order of the answers.
        Assert.Equal("a:1", PlacementActor.Choose([Load("b:2", 0, 0), Load("a:1", 0, 0)], "").Node);
    }

    private static int FreePort()
    {
        using var l = new TcpListener(IPAddress.Loopback, 0);
        l.Start();
        return ((IPEndPoint)l.LocalEndpoint).Port;
    }

    private async Task<(Process Process, int Port)> HostProcess(int? seedPort, string strategy)
    {
        var port = FreePort();
        var config = Path.Combine(_dir, $"node-{port}.conf");
        await File.WriteAllTextAsync(config, $$"""
            actorvmm.cluster.split-brain-resolver { strategy = {{strategy}}, stable-after = 2s }
            actorvmm.cluster.failure-detector.acceptable-heartbeat-pause = 2s
            """);
        var start = new ProcessStartInfo(Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") ?? "dotnet")
        {
            RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false,
        };
        foreach (var a in new[] { Path.Combine(AppContext.BaseDirectory, "actorvmm.dll"), "host", "--port", port.ToString(), "--directory", _dir, "--config", config })
            start.ArgumentList.Add(a);
        if (seedPort is { } s)
        {
            start.ArgumentList.Add("--seed");
            start.ArgumentList.Add($"127.0.0.1:{s}");
        }
        var p = Process.Start(start)!;
        _processes.Add(p);
        p.ErrorDataReceived += (_, _) => { };
        p.BeginErrorReadLine();
        var up = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        p.OutputDataReceived += (_, e) =>
        {
            if (e.Data?.Contains("is up in a cluster") == true) up.TrySetResult();
        };
        p.BeginOutputReadLine();
        await up.Task.WaitAsync(TimeSpan.FromSeconds(120));
        return (p, port);
    }

    private async Task<NodeProtocol.Member[]> UpMembersSeenBy(ControlClient client, int port, int count, TimeSpan limit)
    {
        var deadline = DateTime.UtcNow + limit;
        while (true)
        {
            var members = (await client.NodesAsync($"127.0.0.1:{port}")).Nodes;
            if (members.Length == count && members.All(m => m is { Status: "Up", Reachable: true })) return members;
            if (DateTime.UtcNow > deadline)
                Assert.Fail($"node {port} sees {string.Join(", ", members.Select(m => $"{m.Node} {m.Status} {(m.Reachable ? "" : "unreachable")}"))}, not {count} Up");
            await Task.Delay(250);
        }
    }

    /// <summary>
    /// Two nodes with keep-oldest (the default): a node cannot tell its peer's crash from a partition, and
    /// with two nodes Akka's resolver keeps the oldest even when it is alone. So when the younger node
    /// dies the oldest downs it and goes on; when the oldest dies the younger downs itself and its
    /// process ends (exit code 1, saying so). Surviving the loss of any one node takes three nodes.
    /// </summary>
    [Fact]
    public async Task Of_two_nodes_the_oldest_survives_the_younger_and_the_younger_stops_without_the_oldest()
    {
        var (_, port1) = await HostProcess(null, "keep-oldest");
        var (younger, port2) = await HostProcess(port1, "keep-oldest");
        await using var client = ControlClient.Create(TimeSpan.FromSeconds(10), _dir);
        await UpMembersSeenBy(client, port1, 2, TimeSpan.FromSeconds(60));
        younger.Kill(entireProcessTree: true);
        var left = await UpMembersSeenBy(client, port1, 1, TimeSpan.FromSeconds(60));
        Assert.Equal($"127.0.0.1:{port1}", left.Single().Node);

        var oldest = _processes[0];
        var (survivor, _) = await HostProcess(port1, "keep-oldest");
        await UpMembersSeenBy(client, port1, 2, TimeSpan.FromSeconds(60));
        oldest.Kill(entireProcessTree: true);
        Assert.True(survivor.WaitForExit(60_000), "the younger node did not stop without the oldest");
        Assert.Equal(1, survivor.ExitCode);
        _ = port2;
    }

    /// <summary>Three nodes with keep-majority: a dead node is downed by the two others, which go on; a node
    /// stopped with SIGTERM stops its VMs, leaves the cluster and exits 0.</summary>
    [Fact]
    public async Task Of_three_nodes_the_majority_downs_a_dead_one_and_a_stopped_one_leaves()
    {
        var (_, port1) = await HostProcess(null, "keep-majority");
        var (second, port2) = await HostProcess(port1, "keep-majority");
        var (third, port3) = await HostProcess(port1, "keep-majority");
        await using var client = ControlClient.Create(TimeSpan.FromSeconds(10), _dir);
        await UpMembersSeenBy(client, port1, 3, TimeSpan.FromSeconds(60));
        third.Kill(entireProcessTree: true);
        var left = await UpMembersSeenBy(client, port1, 2, TimeSpan.FromSeconds(60));
        Assert.DoesNotContain($"127.0.0.1:{port3}", left.Select(m => m.Node));

        Assert.Equal(0, Sigterm(second.Id));
        Assert.True(second.WaitForExit(60_000), "the stopped node did not exit");
        Assert.Equal(0, second.ExitCode);
        var last = await UpMembersSeenBy(client, port1, 1, TimeSpan.FromSeconds(60));
        Assert.Equal($"127.0.0.1:{port1}", last.Single().Node);
        _ = port2;
    }

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "kill", SetLastError = true)]
    private static extern int Kill(int pid, int signal);

    private static int Sigterm(int pid) => Kill(pid, 15);
}
