using System.Diagnostics;
using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.Devices.Tracing;
using ActorVmm.Host;
using ActorVmm.Host.Config;
using ActorVmm.Host.Tracing;

namespace ActorVmm.Bench;

/// <summary>
/// What message tracing costs, on the message path of a device read (the `in` exit's path): a
/// driver actor sends <see cref="DeviceProtocol.Read"/> to a real device actor and waits for each
/// <see cref="DeviceProtocol.ReadResult"/>, N round trips, under four set-ups of the same actors:
///   plain     default mailboxes (an untraced VM: tracing off)
///   off       traced mailboxes but no trace registered for the VM (tracing compiled in, switched off)
///   ring      traced, recorded in the in-memory ring only (ctl trace, Perfetto export at the end)
///   json      traced, ring plus every event written as a JSON line (--trace FILE)
/// The ring keeps its events (and the messages in them) alive: a large ring costs the garbage
/// collector more, which the ring-capacity argument shows.
/// The ratio is each set-up's time per round trip over plain's, in the same run.
/// </summary>
internal static class TraceBench
{
    private sealed record Go(int RoundTrips, TaskCompletionSource<double> Done);

    /// <summary>Reads the device N times, one at a time; answers the elapsed milliseconds.</summary>
    private sealed class Driver : ReceiveActor
    {
        private IActorRef _device = ActorRefs.Nobody;
        private int _left;
        private long _id;
        private Stopwatch _clock = new();
        private TaskCompletionSource<double>? _done;

        public Driver(Props device)
        {
            _device = Context.ActorOf(device, "bench-device");
            Receive<Go>(g =>
            {
                _left = g.RoundTrips;
                _done = g.Done;
                _clock = Stopwatch.StartNew();
                _device.Tell(new DeviceProtocol.Read(++_id, 0, 1));
            });
            Receive<DeviceProtocol.ReadResult>(_ =>
            {
                if (--_left > 0)
                {
                    _device.Tell(new DeviceProtocol.Read(++_id, 0, 1));
                    return;
                }
                _clock.Stop();
                _done!.TrySetResult(_clock.Elapsed.TotalMilliseconds);
            });
        }
    }

    public static async Task<int> RunAsync(int roundTrips, int reps, int capacity)
    {
        HostRunner.ConfigureLogging();
        Console.WriteLine($"message tracing: {roundTrips} device read round trips (2 messages each), ring of {capacity} events, best of {reps}");
        var modes = new[] { "plain", "off", "ring", "json" };
        var best = modes.ToDictionary(m => m, _ => double.MaxValue);
        var events = modes.ToDictionary(m => m, _ => 0L);
        var system = HostRunner.CreateSystem(VmConfig.Load(null), "trace-bench");
        try
        {
            for (var r = 0; r < reps; r++)
                foreach (var mode in modes)
                {
                    var (ms, recorded) = await Measure(system, mode, roundTrips, capacity);
                    if (ms < best[mode]) (best[mode], events[mode]) = (ms, recorded);
                }
        }
        finally
        {
            await system.Terminate();
        }
        var plainPer = best["plain"] * 1000 / roundTrips;
        Console.WriteLine($"{"",-8}{"ms",10}{"µs/round trip",15}{"events",10}{"ratio",8}");
        foreach (var mode in modes)
        {
            var per = best[mode] * 1000 / roundTrips;
            Console.WriteLine($"{mode,-8}{best[mode],10:F1}{per,15:F3}{events[mode],10}{per / plainPer,8:F2}");
        }
        Console.WriteLine("tracing off is the plain mailbox of an untraced VM; 'off' is a traced mailbox with no trace registered");
        return 0;
    }

    private static async Task<(double Ms, long Events)> Measure(ActorSystem system, string mode, int roundTrips, int capacity)
    {
        var name = $"vm-trace-bench-{mode}-{Guid.NewGuid():N}";
        var traced = mode != "plain";
        string? file = mode == "json" ? Path.Combine(Path.GetTempPath(), $"{name}.jsonl") : null;
        var recorder = mode is "ring" or "json" ? new TraceRecorder(file, capacity) : null;
        using var registration = recorder is not null ? MessageTraceRegistry.Register(system, $"/user/{name}", recorder) : null;
        Props Mailbox(Props p) => traced ? p.WithMailbox(TracedMailboxType.Id) : p;
        var device = Mailbox(DeviceProtocol.Props("bench", _ => new BenchDevice(), ActorRefs.Nobody));
        var driver = system.ActorOf(Mailbox(Props.Create(() => new Driver(device))), name);
        try
        {
            var done = new TaskCompletionSource<double>(TaskCreationOptions.RunContinuationsAsynchronously);
            driver.Tell(new Go(roundTrips, done));
            var ms = await done.Task.WaitAsync(TimeSpan.FromMinutes(5));
            return (ms, recorder?.Count ?? 0);
        }
        finally
        {
            await driver.GracefulStop(TimeSpan.FromSeconds(10));
            if (recorder is not null) await recorder.DisposeAsync();
            if (file is not null) File.Delete(file);
        }
    }
}
