using Akka.Actor;
using Akka.Cluster;
using ActorVmm.Host.Cluster;
using ActorVmm.Host.Config;
using ActorVmm.Host.Control;
using Xunit;

namespace ActorVmm.Host.Tests;

/// <summary>Host nodes of one cluster in this process, each a whole `actorvmm host` (its node actor and
/// placement), over TLS on 127.0.0.1, sharing a host directory of their own. Dispose ends them.</summary>
public sealed class InProcessCluster : IAsyncDisposable
{
    private readonly List<ActorSystem> _systems = [];

    public string Directory { get; } = System.IO.Directory.CreateTempSubdirectory("actorvmm-cluster-").FullName;

    /// <summary>A node joining <paramref name="seed"/> (or starting the cluster).</summary>
    public ActorSystem StartNode(Address? seed)
    {
        var config = ConfigValues.From([
            new("actorvmm.control.directory", Directory),
            new("actorvmm.cluster.split-brain-resolver.stable-after", "2s"),
        ]).WithFallback(VmConfig.Load(null));
        var system = HostRunner.CreateSystem(config, ControlClient.HostSystemName, cluster: true);
        _systems.Add(system);
        HostNode.Start(system, config, seed is null ? [] : [seed]);
        return system;
    }

    /// <summary>Two nodes, once each sees both Up.</summary>
    public async Task<(ActorSystem First, ActorSystem Second)> TwoNodes()
    {
        var first = StartNode(null);
        var second = StartNode(Akka.Cluster.Cluster.Get(first).SelfAddress);
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(60);
        while (_systems.Any(s => Akka.Cluster.Cluster.Get(s).State.Members.Count(m => m.Status == MemberStatus.Up) < 2))
        {
            Assert.True(DateTime.UtcNow < deadline, "the two nodes did not see each other Up");
            await Task.Delay(100);
        }
        return (first, second);
    }

    public async ValueTask DisposeAsync()
    {
        await Task.WhenAll(_systems.Select(s => s.Terminate()));
        System.IO.Directory.Delete(Directory, recursive: true);
    }
}
