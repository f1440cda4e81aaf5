using System.Globalization;
using System.Runtime.InteropServices;
using Akka.Actor;
using Akka.Configuration;
using ActorVmm.Host.Control;
using ActorVmm.Host.Vm;
using Serilog;

namespace ActorVmm.Host.Cluster;

/// <summary>
/// `actorvmm host`: a long-lived process that joins an Akka.Cluster of host nodes and runs any number
/// of VMs. Membership, gossip, failure detection and downing are Akka.Cluster's (the split-brain
/// resolver, <see cref="ClusterConfig"/>); placement is a cluster singleton (<see cref="PlacementActor"/>);
/// the node's VMs are its <see cref="NodeActor"/> at /user/vmm, which also answers `ctl` for the whole
/// cluster. The node announces itself in the host directory like `run` does, so `ctl` finds it.
/// </summary>
public static class HostNode
{
    /// <summary>The parts of a node's Akka configuration that come from actorvmm.cluster.</summary>
    public static Akka.Configuration.Config ClusterConfig(Akka.Configuration.Config config)
    {
        var roles = config.GetStringList("actorvmm.cluster.roles") ?? [];
        var strategy = config.GetString("actorvmm.cluster.split-brain-resolver.strategy", "keep-oldest");
        if (strategy is not ("keep-oldest" or "keep-majority"))
            throw new Config.ConfigException($"actorvmm.cluster.split-brain-resolver.strategy must be keep-oldest or keep-majority, not \"{strategy}\"");
        var stableAfter = config.GetString("actorvmm.cluster.split-brain-resolver.stable-after", "7s");
        var heartbeatPause = config.GetString("actorvmm.cluster.failure-detector.acceptable-heartbeat-pause", "5s");
        string Quote(string s) => "\"" + s.Replace("\\", "\\\\").Replace("\"", "\\\"") + "\"";
        return ConfigurationFactory.ParseString($$"""
            akka.cluster {
              roles = [{{string.Join(", ", roles.Select(Quote))}}]
              downing-provider-class = "Akka.Cluster.SBR.SplitBrainResolverProvider, Akka.Cluster"
              split-brain-resolver {
                active-strategy = {{strategy}}
                stable-after = {{Quote(stableAfter)}}
                keep-oldest.down-if-alone = on
              }
              failure-detector.acceptable-heartbeat-pause = {{Quote(heartbeatPause)}}
              run-coordinated-shutdown-when-down = on
              log-info = off
            }
            # Off: Akka.Cluster.Tools warns "failed to find an associated singleton" at every proxy start,
            # before it could have looked (a known Akka.NET defect); placement answers for itself.
            akka.cluster.singleton-proxy.log-singleton-identification-failure = off
            akka.coordinated-shutdown.exit-clr = off
            # A migration's StreamRef: the target subscribes once the offer is accepted, which takes
            # seconds on a loaded machine, not 30 (StreamRefs' default).
            akka.stream.materializer.stream-ref.subscription-timeout = 2 m
            """).WithFallback(Akka.Streams.ActorMaterializer.DefaultConfig());
    }

    /// <summary>"HOST:PORT" → the address of the host node there.</summary>
    public static Address SeedAddress(string seed)
    {
        var colon = seed.LastIndexOf(':');
        if (colon <= 0 || !int.TryParse(seed[(colon + 1)..], NumberStyles.None, CultureInfo.InvariantCulture, out var port) || port is < 1 or > 65535)
            throw new Config.ConfigException($"--seed \"{seed}\" is not HOST:PORT");
        return new Address("akka.ssl.tcp", ControlClient.HostSystemName, seed[..colon], port);
    }

    /// <summary>
    /// Makes <paramref name="system"/> (made by HostRunner.CreateSystem with cluster: true) a host node:
    /// the placement singleton's manager and proxy, the node actor at /user/vmm (VMs get
    /// <paramref name="config"/>'s actorvmm.vm as defaults), then joins <paramref name="seeds"/>, or
    /// itself when there are none (a new cluster). Answers the node actor.
    /// </summary>
    public static IActorRef Start(ActorSystem system, Akka.Configuration.Config config, IReadOnlyList<Address> seeds)
    {
        var cluster = Akka.Cluster.Cluster.Get(system);
        var (manager, proxyProps) = PlacementActor.Props(system);
        system.ActorOf(manager, PlacementActor.ManagerName);
        var proxy = system.ActorOf(proxyProps, PlacementActor.ProxyName);
        var node = system.ActorOf(NodeActor.Props(config.WithFallback(Config.VmConfig.Load(null)), proxy), ControlProtocol.DirectoryName);
        if (seeds.Count == 0) cluster.Join(cluster.SelfAddress);
        else cluster.JoinSeedNodes(seeds);
        return node;
    }

    /// <summary>Runs the node until SIGINT/SIGTERM (it stops its VMs and leaves the cluster, exit 0) or until
    /// the cluster removes it (exit 1).</summary>
    public static async Task<int> RunAsync(Akka.Configuration.Config config, IReadOnlyList<string> seeds, TextWriter stdout, TextWriter stderr)
    {
        var seedAddresses = seeds.Select(SeedAddress).ToList();
        ActorSystem system;
        try { system = HostRunner.CreateSystem(config, ControlClient.HostSystemName, cluster: true); }
        catch (Exception e) when (e is Akka.Remote.RemoteTransportException or System.Net.Sockets.SocketException
                                      or ConfigurationException or ClusterSecurityException)
        {
            await stderr.WriteLineAsync($"actorvmm: error: cannot start the host node: {e.Message}");
            return VmProtocol.Outcome.HostErrorCode;
        }
        var cluster = Akka.Cluster.Cluster.Get(system);
        var up = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        cluster.RegisterOnMemberUp(() => up.TrySetResult());
        var node = Start(system, config, seedAddresses);
        var self = NodeProtocol.NodeName(cluster.SelfAddress);

        IDisposable? announcement = null;
        try { announcement = HostDirectory.Announce(HostRunner.DirectoryOf(config), self, []); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or ClusterSecurityException)
        {
            Log.Warning("cannot announce the node's address ({Reason}); use ctl --host {Address}", e.Message, self);
        }
        using var withdraw = announcement;
        await stdout.WriteLineAsync($"actorvmm host: node {self} {(seedAddresses.Count == 0 ? "starts a cluster" : $"joins {string.Join(", ", seeds)}")}");
        await stdout.FlushAsync();

        var stop = new TaskCompletionSource<string>(TaskCreationOptions.RunContinuationsAsynchronously);
        using var sigint = PosixSignalRegistration.Create(PosixSignal.SIGINT, c => { c.Cancel = true; stop.TrySetResult("SIGINT"); });
        using var sigterm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, c => { c.Cancel = true; stop.TrySetResult("SIGTERM"); });

        var first = await Task.WhenAny(up.Task, stop.Task, system.WhenTerminated);
        if (first == up.Task)
        {
            await stdout.WriteLineAsync($"actorvmm host: node {self} is up in a cluster of {cluster.State.Members.Count} node(s)");
            await stdout.FlushAsync();
            first = await Task.WhenAny(stop.Task, system.WhenTerminated);
        }
        if (first == system.WhenTerminated)
        {
            await stderr.WriteLineAsync($"actorvmm host: node {self} was removed from the cluster (downed); its VMs are stopped");
            return 1;
        }
        await stderr.WriteLineAsync($"actorvmm host: {stop.Task.Result}: stopping the VMs of {self} and leaving the cluster");
        try { await node.Ask<NodeActor.AllStopped>(NodeActor.StopAll.Instance, TimeSpan.FromSeconds(60)); }
        catch (Exception e) when (e is AskTimeoutException or TaskCanceledException)
        {
            await stderr.WriteLineAsync("actorvmm host: some VMs did not stop within 60 s");
        }
        await CoordinatedShutdown.Get(system).Run(CoordinatedShutdown.ClusterLeavingReason.Instance);
        return 0;
    }
}
