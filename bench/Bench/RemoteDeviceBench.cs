using System.Diagnostics;
using Akka.Actor;
using Akka.Cluster;
using ActorVmm.Devices;
using ActorVmm.Host;
using ActorVmm.Host.Cluster;
using ActorVmm.Host.Config;
using ActorVmm.Host.Control;
using ActorVmm.Host.Vm;

namespace ActorVmm.Bench;

/// <summary>
/// What a device on another host node costs the vcpu, without /dev/kvm: COM1's UART beside its VM (a
/// device actor, as every VM has it) and on another node of the cluster (the proxy and the node that
/// hosts it: <see cref="RemoteDevices"/>), both nodes in this process on 127.0.0.1 over TLS, as
/// `actorvmm host` runs them. A driver actor stands in for the vcpu: a read's round trip (one at a
/// time, as a vcpu waits for it), and posted writes to the transmit register in batches of 512 behind
/// one read (its answer acknowledges them all, as the vcpu's window works). Each figure is the best of
/// the repetitions; the ratio is remote / beside.
/// </summary>
internal static class RemoteDeviceBench
{
    public static async Task<int> RunAsync(int operations, int reps)
    {
        HostRunner.ConfigureLogging();
        var dir = Directory.CreateTempSubdirectory("actorvmm-bench-remotedev-").FullName;
        var systems = new List<ActorSystem>();
        try
        {
            if (await BenchCluster.StartTwoAsync(dir, systems) is not [var vmNode, var other]) return 1;

            var interrupts = new VmInterrupts { IoApic = ActorRefs.Nobody, Pic = ActorRefs.Nobody };
            var clock = new MonotonicClock();
            static void Discard(byte _) { }
            IBusDevice Model(IPlatformEvents events, object? state) =>
                PcPlatform.HostableModel(PcPlatform.Com1Kind, new DeviceContext(events, interrupts, clock), Discard, state);
            Props Local(object? state) => DeviceProtocol.Props("uart0", events => Model(events, null), Model, ActorRefs.Nobody, initialState: state)
                .WithDispatcher(DeviceProtocol.DispatcherId);
            var beside = vmNode.ActorOf(Local(null), "uart0-beside");
            var remote = vmNode.ActorOf(RemoteDevices.ProxyProps(new RemoteDevices.Setup("bench", "uart0", PcPlatform.Com1Kind,
                Akka.Cluster.Cluster.Get(other).SelfAddress, ActorRefs.Nobody, ActorRefs.Nobody, ActorRefs.Nobody, Discard, Local, null,
                TimeSpan.FromSeconds(60))), "uart0-remote");

            Console.WriteLine($"COM1 beside its VM vs on another node (two nodes in this process, 127.0.0.1, TLS): {operations} operations, best of {reps}");
            Console.WriteLine($"{"",-22}{"beside µs",11}{"remote µs",11}{"ratio",8}");
            foreach (var (name, writes) in new[] { ("read round trip", false), ("posted write", true) })
            {
                double near = double.MaxValue, far = double.MaxValue;
                await Measure(vmNode, remote, 100, writes); // warm-up: placement, serializers, JIT
                await Measure(vmNode, beside, 100, writes);
                for (var i = 0; i < reps; i++)
                {
                    near = Math.Min(near, await Measure(vmNode, beside, operations, writes));
                    far = Math.Min(far, await Measure(vmNode, remote, operations, writes));
                }
                Console.WriteLine($"{name,-22}{near,11:F2}{far,11:F2}{far / near,8:F1}");
            }
            Console.WriteLine("(µs per operation as the vcpu sees it; a guest's exit adds KVM's cost to both)");
            await remote.GracefulStop(TimeSpan.FromSeconds(10)); // before the nodes go: nothing to take back
            return 0;
        }
        finally
        {
            // The VM's node first: its proxy would otherwise see the other node go and take the device back.
            foreach (var s in systems) await s.Terminate();
            Directory.Delete(dir, recursive: true);
        }
    }

    /// <summary>µs per operation: <paramref name="count"/> reads one at a time, or posted writes in
    /// batches of 512, each batch followed by a read.</summary>
    private static async Task<double> Measure(ActorSystem system, IActorRef device, int count, bool writes)
    {
        var done = new TaskCompletionSource<TimeSpan>(TaskCreationOptions.RunContinuationsAsynchronously);
        system.ActorOf(Props.Create(() => new Driver(device, count, writes, done)));
        return (await done.Task.WaitAsync(TimeSpan.FromMinutes(5))).TotalMicroseconds / count;
    }

    /// <summary>The vcpu's part: sends, waits for each read's answer, times the whole.</summary>
    private sealed class Driver : ReceiveActor
    {
        private const int Batch = 512;
        private const ulong Thr = 0, Scr = 7;

        public Driver(IActorRef device, int count, bool writes, TaskCompletionSource<TimeSpan> done)
        {
            var clock = Stopwatch.StartNew();
            var left = count;
            long id = 0;
            void Next()
            {
                if (left <= 0)
                {
                    done.TrySetResult(clock.Elapsed);
                    Context.Stop(Self);
                    return;
                }
                if (writes)
                {
                    var n = Math.Min(Batch, left);
                    for (var i = 0; i < n; i++) device.Tell(new DeviceProtocol.Write(Thr, 1, (byte)'x'));
                    left -= n;
                }
                else left--;
                device.Tell(new DeviceProtocol.Read(++id, Scr, 1));
            }
            Receive<DeviceProtocol.ReadResult>(_ => Next());
            Receive<DeviceProtocol.WriteCredit>(_ => { });
            Next();
        }
    }
}
