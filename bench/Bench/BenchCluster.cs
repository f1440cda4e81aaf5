using Akka.Actor;
using Akka.Cluster;
using ActorVmm.Host;
using ActorVmm.Host.Cluster;
using ActorVmm.Host.Config;
using ActorVmm.Host.Control;

namespace ActorVmm.Bench;

/// <summary>Two host nodes of one cluster in this process, on 127.0.0.1 over TLS, as `actorvmm host` runs them.</summary>
internal static class BenchCluster
{
    /// <summary>Starts both (the first starts the cluster) with <paramref name="settings"/> over the defaults and
    /// waits until each sees both Up; null, with the reason printed, if they do not within 60 s. Every system
    /// started is added to <paramref name="systems"/>, for the caller to terminate.</summary>
    public static async Task<ActorSystem[]?> StartTwoAsync(string directory, List<ActorSystem> systems, params (string Key, string Value)[] settings)
    {
        ActorSystem Node(Address? seed)
        {
            var config = ConfigValues.From([new("actorvmm.control.directory", directory), .. settings.Select(s => KeyValuePair.Create(s.Key, s.Value))])
                .WithFallback(VmConfig.Load(null));
            var system = HostRunner.CreateSystem(config, ControlClient.HostSystemName, cluster: true);
            systems.Add(system);
            HostNode.Start(system, config, seed is null ? [] : [seed]);
            return system;
        }
        var first = Node(null);
        var second = Node(Akka.Cluster.Cluster.Get(first).SelfAddress);
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(60);
        while (new[] { first, second }.Any(s => Akka.Cluster.Cluster.Get(s).State.Members.Count(m => m.Status == MemberStatus.Up) < 2))
        {
            if (DateTime.UtcNow > deadline)
            {
                Console.Error.WriteLine("actorvmm-bench: the two nodes did not see each other Up within 60 s");
                return null;
            }
            await Task.Delay(100);
        }
        return [first, second];
    }
}
