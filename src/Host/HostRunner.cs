using System.Runtime.InteropServices;
using Akka.Actor;
using Akka.Configuration;
using ActorVmm.Devices.Tracing;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Config;
using ActorVmm.Host.Control;
using ActorVmm.Host.Tracing;
using ActorVmm.Host.Vm;
using ActorVmm.Vcpu;
using Serilog;
using Serilog.Events;

namespace ActorVmm.Host;

/// <summary>Runs one VM in this process: the actor system, the VM, Ctrl-C, the outcome.</summary>
public static class HostRunner
{
    /// <summary>Options that come from the command line only.</summary>
    public sealed record RunOptions(bool PrintTrace = false, bool TraceToStdout = false);

    public static void ConfigureLogging(LogEventLevel level = LogEventLevel.Warning)
    {
        // Logs go to stderr: stdout is the guest's console.
        Log.Logger = new LoggerConfiguration()
            .MinimumLevel.Is(level)
            .WriteTo.Console(standardErrorFromLevel: LogEventLevel.Verbose,
                outputTemplate: "[{Timestamp:HH:mm:ss.fff} {Level:u3}] {Message:lj}{NewLine}{Exception}")
            .CreateLogger();
    }

    /// <summary>The actor system for VMs: the given configuration over the built-in defaults. With
    /// <paramref name="control"/>, remoting listens on actorvmm.control.hostname:port (127.0.0.1 by
    /// default) and the directory of VMs runs at /user/vmm for `actorvmm ctl`.</summary>
    /// <remarks>With <paramref name="cluster"/> (a host node, `actorvmm host`), the provider is Akka.Cluster's, remoting
    /// listens on actorvmm.cluster.hostname:port and the node's own actors come from <see cref="Cluster.HostNode"/>.</remarks>
    public static ActorSystem CreateSystem(Akka.Configuration.Config config, string name = "actorvmm", bool control = false, bool cluster = false)
    {
        if (cluster)
        {
            control = true;
            config = Cluster.HostNode.ClusterConfig(config).WithFallback(config);
        }
        if (control)
        {
            var hostname = config.GetString(cluster ? "actorvmm.cluster.hostname" : "actorvmm.control.hostname", "127.0.0.1");
            var port = config.GetInt(cluster ? "actorvmm.cluster.port" : "actorvmm.control.port", 0);
            // connection-timeout bounds a new association's handshake: 60 s, not 15, so that a
            // heavily loaded host (an emulated CI machine) still answers its first `ctl`.
            // The watch failure detector judges `ctl` clients (not cluster members), which the
            // console and trace hubs watch: a phi-accrual detector also fires when this process
            // itself was starved, and a client taken for dead is quarantined and hears nothing
            // more (not even its VM's end). 60 s as ctl's own side; a client that really went
            // away costs at most that long of output sent to nowhere.
            config = ConfigurationFactory.ParseString($$"""
                akka.actor.provider = {{(cluster ? "cluster" : "remote")}}
                akka.remote.dot-netty.tcp { hostname = "{{hostname}}", port = {{port}}, connection-timeout = 60 s }
                akka.remote.watch-failure-detector.acceptable-heartbeat-pause = 60 s
                akka.remote.log-remote-lifecycle-events = off
                {{ClusterCertificate.RemotingConfig}}
                """).WithFallback(config);
            RemotingTransport.WithoutDotNettyLogging();
        }
        config = config
            .WithFallback(ConfigurationFactory.ParseString(VcpuProtocol.DefaultConfig))
            .WithFallback(ConfigurationFactory.ParseString(TracedMailboxType.DefaultConfig));
        var setup = BootstrapSetup.Create().WithConfig(config);
        var system = control
            ? ActorSystem.Create(name, setup.And(ClusterCertificate.Remoting(ClusterCertificate.LoadOrCreate(CertificatePath(config)))))
            : ActorSystem.Create(name, setup);
        if (control && !cluster) system.ActorOf(ControlProtocol.DirectoryProps(ControlAddress(system)), ControlProtocol.DirectoryName);
        return system;
    }

    /// <summary>The host directory: actorvmm.control.directory, else <see cref="HostDirectory.DefaultPath"/>.</summary>
    public static string DirectoryOf(Akka.Configuration.Config config) =>
        config.GetString("actorvmm.control.directory", "") is { Length: > 0 } d ? d : HostDirectory.DefaultPath();

    /// <summary>The cluster certificate: actorvmm.cluster.certificate, else cluster.pfx in the host directory.</summary>
    public static string CertificatePath(Akka.Configuration.Config config) =>
        config.GetString("actorvmm.cluster.certificate", "") is { Length: > 0 } c ? c : ClusterCertificate.DefaultPath(DirectoryOf(config));

    /// <summary>"127.0.0.1:PORT": what `ctl --host` takes for this system.</summary>
    public static string ControlAddress(ActorSystem system)
    {
        var address = ((ExtendedActorSystem)system).Provider.DefaultAddress;
        return $"{address.Host}:{address.Port}";
    }

    /// <summary>
    /// Starts <see cref="CreateSystem"/> on a thread of its own, with the control endpoint when
    /// actorvmm.control.enabled is on. Creating the actor system is the slowest step of a host's
    /// start (Akka's settings and loggers, remoting's listener) and needs nothing of the VM, so
    /// <see cref="RunAsync"/> opens KVM and lays out and loads guest memory meanwhile (the VM's
    /// actors, which need the system, come after). Configure logging first: the system logs
    /// through Serilog's logger from its start.
    /// </summary>
    public static Task<ActorSystem> StartSystem(Akka.Configuration.Config config)
    {
        var control = config.GetBoolean("actorvmm.control.enabled", false);
        var started = new TaskCompletionSource<ActorSystem>(TaskCreationOptions.RunContinuationsAsynchronously);
        new Thread(() =>
        {
            try
            {
                var system = CreateSystem(config, control: control);
                StartupTimes.Mark("actor system");
                started.SetResult(system);
            }
            catch (Exception e) { started.SetException(e); }
        }) { IsBackground = true, Name = "actor-system-start" }.Start();
        return started.Task;
    }

    /// <summary>Runs the VM in the actor system <paramref name="starting"/> (from <see cref="StartSystem"/>,
    /// with the same <paramref name="config"/>), then terminates the system.</summary>
    public static async Task<int> RunAsync(Task<ActorSystem> starting, Akka.Configuration.Config config, VmConfig vm, BootImage boot,
        RunOptions options, TextWriter stderr, Snapshot.VmRestore? restore = null)
    {
        var control = config.GetBoolean("actorvmm.control.enabled", false);
        if (vm.DeviceNodes.Count > 0)
        {
            // `run` is one VM in a process of its own, in no cluster: no other node to run a device on.
            await stderr.WriteLineAsync($"actorvmm: error: devices on other nodes ({string.Join(", ", vm.DeviceNodes.Keys)}) need a cluster: " +
                                        "start the VM with `actorvmm ctl run` on an `actorvmm host` node");
            return VmProtocol.Outcome.HostErrorCode;
        }
        SerialConsole? console = null;
        TraceRecorder? trace = null;
        try
        {
            try
            {
                console = vm.SerialOutput == "stdout" ? SerialConsole.ToStdout() : SerialConsole.ToFile(vm.SerialOutput);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                await stderr.WriteLineAsync($"actorvmm: error: cannot open serial output {vm.SerialOutput}: {e.Message}");
                return VmProtocol.Outcome.HostErrorCode;
            }
            if (vm.TracePath is not null || vm.PerfettoPath is not null || options.PrintTrace || vm.TraceLive)
            {
                try { trace = new TraceRecorder(vm.TracePath, filter: TraceFilter.Parse(vm.TraceFilter)); }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException)
                {
                    await stderr.WriteLineAsync($"actorvmm: error: cannot open trace file {vm.TracePath}: {e.Message}");
                    return VmProtocol.Outcome.HostErrorCode;
                }
            }
            var spec = restore?.ToSpec(vm.Name)
                       ?? new VmSpec(vm.Name, vm.MemoryBytes, vm.Cpus, boot, vm.Lapic, vm.Paging, vm.Superpages, vm.SharedMemory, vm.TestDevices) { Cpu = vm.Cpu, Rng = vm.Rng, Disk = vm.Disk, VirtioConsole = vm.VirtioConsole, Net = vm.Net, DeviceNodes = vm.DeviceNodes };
            var builder = new VmBuilder(starting, spec).WithStandardDevices(console);
            if (restore is not null) builder.WithRestore(restore);
            if (trace is not null) builder.WithTrace(trace);

            // Signals are caught from before the VM starts: a Ctrl-C that comes while it is being
            // built stops it as soon as it exists, instead of killing the process uncleanly.
            var interrupt = new Interruption();
            using var sigint = PosixSignalRegistration.Create(PosixSignal.SIGINT, interrupt.Handle);
            using var sigterm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, interrupt.Handle);

            RunningVm running;
            try { running = builder.Start(); StartupTimes.Mark("vm built"); }
            catch (VmBuildException e)
            {
                await stderr.WriteLineAsync($"actorvmm: error: {e.Message}");
                return VmProtocol.Outcome.HostErrorCode;
            }
            catch (Exception e) when (e is Akka.Remote.RemoteTransportException or System.Net.Sockets.SocketException
                                          or Akka.Configuration.ConfigurationException or ClusterSecurityException)
            {
                await stderr.WriteLineAsync($"actorvmm: error: cannot start the control endpoint: {e.Message}");
                return VmProtocol.Outcome.HostErrorCode;
            }
            var system = starting.Result; // up: the VM's actors are in it

            IDisposable? announcement = null;
            IActorRef? consoleHub = null;
            if (control)
            {
                var hub = trace is null ? ActorRefs.Nobody : system.ActorOf(TraceProtocol.Props(vm.Name, trace), $"trace-{running.Actor.Path.Name}");
                consoleHub = system.ActorOf(Cluster.ConsoleProtocol.Props(vm.Name), $"console-{running.Actor.Path.Name}");
                var target = consoleHub;
                console.AddSink(bytes => target.Tell(new Cluster.ConsoleProtocol.Output(bytes)));
                consoleHub.Tell(new Cluster.ConsoleProtocol.Connect(running.Actor, spec.VirtioConsole));
                system.ActorSelection($"/user/{ControlProtocol.DirectoryName}").Tell(new ControlProtocol.Register(vm.Name, running.Actor, hub) { Console = consoleHub });
                try { announcement = HostDirectory.Announce(DirectoryOf(config), ControlAddress(system), [vm.Name]); }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException)
                {
                    Log.Warning("cannot announce the control address ({Reason}); use ctl --host {Address}", e.Message, ControlAddress(system));
                }
            }
            using var withdraw = announcement;
            await using (running)
            {
                if (vm.SerialInput == "stdin")
                    console.StartInputFromStdin(system, spec.VirtioConsole
                        ? [running.Actor.Path / "uart0", running.Actor.Path / PcPlatform.VirtioConsoleName]
                        : [running.Actor.Path / "uart0"]);
                interrupt.Attach(running);

                var outcome = vm.TimeoutSeconds > 0
                    ? await running.WaitAsync(TimeSpan.FromSeconds(vm.TimeoutSeconds))
                    : await running.Ended;
                StartupTimes.Mark("guest ended");
                console.Flush();
                consoleHub?.Tell(new Cluster.ConsoleProtocol.VmEnded($"{Describe(outcome)} (exit code {outcome.ExitCode})"));
                if (options.PrintTrace && trace is not null) PrintTrace(trace, Console.Out);
                if (vm.PerfettoPath is not null && trace is not null)
                {
                    try
                    {
                        await using var file = File.Create(vm.PerfettoPath);
                        PerfettoExport.Write(trace.Snapshot(), file, $"ActorVmm {vm.Name}");
                    }
                    catch (Exception e) when (e is IOException or UnauthorizedAccessException)
                    {
                        await stderr.WriteLineAsync($"actorvmm: error: cannot write {vm.PerfettoPath}: {e.Message}");
                    }
                }
                await stderr.WriteLineAsync($"actorvmm: {vm.Name}: {Describe(outcome)} (exit code {outcome.ExitCode})");
                return outcome.ExitCode;
            }
        }
        finally
        {
            console?.Dispose();
            // Also when the VM could not be built: the system may have come up meanwhile. Its own
            // failure to start was reported above, unless the VM's came first.
            ActorSystem? system = null;
            try { system = await starting; }
            catch (Exception) { }
            if (system is not null) await system.Terminate();
            StartupTimes.Mark("stopped");
            if (trace is not null)
            {
                await trace.DisposeAsync();
                if (trace.WriteFailure is { } failure)
                    await stderr.WriteLineAsync($"actorvmm: warning: the trace file {vm.TracePath} is incomplete: {failure.Message} ({trace.Lost} events not written)");
            }
        }
    }

    /// <summary>SIGINT/SIGTERM: pause (every vcpu out of the guest), then stop the VM, once it exists.</summary>
    private sealed class Interruption
    {
        private readonly object _gate = new();
        private RunningVm? _vm;
        private PosixSignal? _pending;

        public void Handle(PosixSignalContext context)
        {
            context.Cancel = true;
            lock (_gate)
            {
                if (_vm is null) _pending ??= context.Signal;
                else Stop(_vm, context.Signal);
            }
        }

        public void Attach(RunningVm vm)
        {
            lock (_gate)
            {
                _vm = vm;
                if (_pending is { } signal) Stop(vm, signal);
            }
        }

        private static void Stop(RunningVm vm, PosixSignal signal)
        {
            vm.Actor.Tell(VmProtocol.Pause.Instance);
            vm.Actor.Tell(new VmProtocol.Stop($"interrupted by {signal}"));
        }
    }

    public static string Describe(VmProtocol.Outcome outcome) => outcome.Kind switch
    {
        VmProtocol.OutcomeKind.Halted => $"guest halted ({outcome.Detail})",
        VmProtocol.OutcomeKind.DebugExit => $"guest exited through debug-exit ({outcome.Detail})",
        VmProtocol.OutcomeKind.Reset => outcome.Detail,
        VmProtocol.OutcomeKind.PowerOff => outcome.Detail,
        VmProtocol.OutcomeKind.TripleFault => $"guest triple-faulted: {outcome.Detail}",
        VmProtocol.OutcomeKind.VcpuError => $"VM stopped on a vcpu error: {outcome.Detail}",
        _ => $"VM stopped: {outcome.Detail}",
    };

    /// <summary>
    /// The trace as text: its start and end (all of it when short), the causal chain of each
    /// interrupt the guest accepted (each message's parent up to the vcpu exit that began it), and
    /// the messages counted by sender, receiver and type.
    /// </summary>
    public static void PrintTrace(TraceRecorder trace, TextWriter output, int head = 40, int tail = 20)
    {
        var events = trace.Snapshot();
        output.WriteLine();
        output.WriteLine($"--- message trace: {trace.Count} messages ---");
        if (events.Count <= head + tail + 1)
            foreach (var e in events) output.WriteLine(TraceRecorder.ToText(e));
        else
        {
            foreach (var e in events.Take(head)) output.WriteLine(TraceRecorder.ToText(e));
            output.WriteLine($"    ... {events.Count - head - tail} more (--trace FILE keeps every one) ...");
            foreach (var e in events.Skip(events.Count - tail)) output.WriteLine(TraceRecorder.ToText(e));
        }
        var byId = events.ToDictionary(e => e.Id);
        foreach (var accepted in events.Where(e => e.Type == "InterruptAccepted").Take(3))
        {
            output.WriteLine($"--- how interrupt #{accepted.Id} reached the guest (each line the parent of the next) ---");
            var chain = new List<TraceEvent>();
            for (TraceEvent? e = accepted; e is not null; e = e.ParentId != 0 && byId.TryGetValue(e.ParentId, out var p) ? p : null)
            {
                chain.Add(e);
                if (e.Type == "GuestExit") break; // the guest's own action began it
            }
            chain.Reverse();
            foreach (var e in chain) output.WriteLine(TraceRecorder.ToText(e));
        }
        output.WriteLine("--- messages by type ---");
        foreach (var k in TraceRecorder.CountByKind(events))
            output.WriteLine($"{k.Count,8}  {k.Sender} -> {k.Receiver}  {k.Type}");
    }
}
