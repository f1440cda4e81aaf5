using System.CommandLine;
using System.Globalization;
using ActorVmm.Devices;
using ActorVmm.Host;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Config;
using ActorVmm.Host.Guests;
using ActorVmm.Host.Vm;
using Akka.Configuration;

StartupTimes.Mark("main");
return await Cli.MainAsync(args);

namespace ActorVmm.Host
{
    /// <summary>The `actorvmm` command line. Errors are one line on stderr and exit code 2.</summary>
    public static class Cli
    {
        public static async Task<int> MainAsync(string[] args)
        {
            // First uses that are slow and would otherwise come on the actor system's start, the
            // critical path of a run, made on the thread pool while the command line is parsed:
            // Akka's HOCON reads each duration through a compiled regular expression, built and
            // compiled (tens of ms) at its first use; Akka seeds its actors' uids from the system's
            // random number generator, which loads OpenSSL at its first use.
            if (args.Length > 0 && args[0] is "run" or "demo")
                _ = Task.Run(() =>
                {
                    _ = ConfigurationFactory.ParseString("d = 1s").GetTimeSpan("d");
                    _ = System.Security.Cryptography.RandomNumberGenerator.GetInt32(int.MaxValue);
                });

            var root = new RootCommand("ActorVmm: a virtual machine monitor for Linux KVM built from Akka.NET actors");
            root.Add(RunCommand());
            root.Add(DemoCommand());
            root.Add(CtlCommand());

            var parse = root.Parse(args);
            if (parse.Errors.Count > 0)
            {
                foreach (var error in parse.Errors) await Console.Error.WriteLineAsync($"actorvmm: error: {error.Message}");
                await Console.Error.WriteLineAsync("Try 'actorvmm --help'.");
                return VmProtocol.Outcome.HostErrorCode;
            }
            try
            {
                // Signals are the commands' own business (run and demo stop the VM cleanly, which can
                // take seconds on a slow host): no forced exit two seconds after a Ctrl-C.
                return await parse.InvokeAsync(new InvocationConfiguration { EnableDefaultExceptionHandler = false, ProcessTerminationTimeout = null });
            }
            catch (Exception e) when (e is ConfigException or BootException or VmBuildException or Control.ControlException)
            {
                await Console.Error.WriteLineAsync($"actorvmm: error: {e.Message}");
                return VmProtocol.Outcome.HostErrorCode;
            }
            finally { StartupTimes.Write(Console.Error); }
        }

        private static Command RunCommand()
        {
            var config = new Option<string?>("--config") { Description = "a HOCON VM file (see hocon/vms/example.conf)" };
            var memory = new Option<string?>("--memory", "-m") { Description = "guest RAM, e.g. 64M, 1G" };
            var cpus = new Option<string?>("--cpus") { Description = "number of vcpus (1-16); vcpu 0 boots" };
            var name = new Option<string?>("--name") { Description = "VM name" };
            var firmware = new Option<string?>("--firmware") { Description = "flat firmware image placed below 4 GiB (reset vector F000:FFF0)" };
            var flat = new Option<string?>("--flat") { Description = "flat binary loaded at --load-address, entered in real mode" };
            var loadAddress = new Option<string?>("--load-address") { Description = "where --flat loads (default 0x7C00)" };
            var entry = new Option<string?>("--entry") { Description = "real-mode entry CS:IP in hex for --flat (default from the load address)" };
            var kernel = new Option<string?>("--kernel") { Description = "a kernel image, recognised by its contents (multiboot ELF or Linux bzImage)" };
            var initrd = new Option<string?>("--initrd") { Description = "with --kernel: the initial ramdisk (Linux) or first module (multiboot)" };
            var append = new Option<string?>("--append") { Description = "with --kernel: the kernel command line" };
            var serial = new Option<string?>("--serial") { Description = "serial console output: stdout or a file" };
            var trace = new Option<string?>("--trace") { Description = "write the message trace to FILE as JSON lines" };
            var timeout = new Option<string?>("--timeout") { Description = "stop the VM after this many seconds" };
            var perfetto = new Option<string?>("--perfetto") { Description = "write the message trace to FILE for the Perfetto UI when the VM ends" };
            var traceFilter = new Option<string?>("--trace-filter") { Description = "keep only some of the trace: actor=NAME,type=NAME,sample=N" };
            var lapic = new Option<string?>("--lapic") { Description = "local APICs: emulated (vlapic actors) or assisted (in KVM: split irqchip)" };
            var cpu = new Option<string?>("--cpu") { Description = "CPU model: host[,+feature|-feature...], e.g. host,-x2apic,-pcid,-tsc-deadline (QEMU's -cpu syntax)" };
            var shm = new Option<string?>("--shm") { Description = "FILE[,SIZE]: a shared-memory device at 0xE0000000 backed by FILE (created or extended to SIZE); wires all guest memory" };
            var testDevices = new Option<bool>("--test-devices")
            {
                Description = "QEMU's test devices for conformance suites (pc-testdev: ports 0xE0-0xEB and 0x2000-0x2017, MMIO RAM at 0xFF000000)",
            };
            var rng = new Option<bool>("--rng") { Description = "a virtio entropy device (virtio-rng, PCI 00:01.0) fed from the host's RandomNumberGenerator" };
            var restore = new Option<string?>("--restore") { Description = "start the VM snapshotted in DIR (`ctl snapshot`) where it stopped; its pages are read on first touch" };
            var restoreEager = new Option<bool>("--restore-eager") { Description = "with --restore: read all of guest memory before the first instruction" };
            var command = new Command("run", "run a VM") { config, memory, cpus, name, firmware, flat, loadAddress, entry, kernel, initrd, append, serial, trace, timeout, perfetto, traceFilter, lapic, cpu, shm, testDevices, rng, restore, restoreEager };
            command.SetAction(async (parse, _) =>
            {
                var overrides = new List<KeyValuePair<string, string>>();
                void Override(string key, string? value)
                {
                    if (value is not null) overrides.Add(new($"actorvmm.vm.{key}", value));
                }
                Override("memory", parse.GetValue(memory));
                Override("cpus", parse.GetValue(cpus));
                Override("name", parse.GetValue(name));
                Override("serial.output", parse.GetValue(serial));
                Override("trace", parse.GetValue(trace));
                Override("timeout", parse.GetValue(timeout));
                Override("perfetto", parse.GetValue(perfetto));
                Override("trace-filter", parse.GetValue(traceFilter));
                Override("lapic", parse.GetValue(lapic));
                Override("cpu", parse.GetValue(cpu));
                if (parse.GetValue(testDevices)) Override("test-devices", "on");
                if (parse.GetValue(rng)) Override("rng", "on");
                Override("boot.kernel", parse.GetValue(kernel));
                Override("boot.initrd", parse.GetValue(initrd));
                Override("boot.append", parse.GetValue(append));
                if (parse.GetValue(shm) is { } shmText)
                {
                    var comma = shmText.LastIndexOf(',');
                    if (comma == 0 || shmText.Length == 0) throw new ConfigException($"--shm \"{shmText}\": give FILE or FILE,SIZE");
                    Override("shm.file", comma < 0 ? shmText : shmText[..comma]);
                    Override("shm.size", comma < 0 ? "0" : shmText[(comma + 1)..]);
                }
                var hocon = ConfigValues.From(overrides).WithFallback(VmConfig.Load(parse.GetValue(config)));
                var vm = VmConfig.From(hocon);

                if (parse.GetValue(restore) is { } snapshotDir)
                {
                    // The snapshot is the machine: what would shape another one is refused, not ignored.
                    var shaping = new (string Option, bool Given)[]
                    {
                        ("--memory", parse.GetValue(memory) is not null), ("--cpus", parse.GetValue(cpus) is not null),
                        ("--lapic", parse.GetValue(lapic) is not null), ("--cpu", parse.GetValue(cpu) is not null),
                        ("--shm", parse.GetValue(shm) is not null), ("--test-devices", parse.GetValue(testDevices)), ("--rng", parse.GetValue(rng)),
                        ("--kernel", parse.GetValue(kernel) is not null), ("--initrd", parse.GetValue(initrd) is not null),
                        ("--append", parse.GetValue(append) is not null), ("--firmware", parse.GetValue(firmware) is not null),
                        ("--flat", parse.GetValue(flat) is not null),
                    }.Where(o => o.Given).Select(o => o.Option).ToArray();
                    if (shaping.Length > 0)
                        throw new ConfigException($"--restore starts the machine the snapshot holds: {string.Join(", ", shaping)} cannot change it");
                    // The actor system starts on a thread of its own while the snapshot is read and checked.
                    HostRunner.ConfigureLogging();
                    var starting = HostRunner.StartSystem(hocon);
                    Snapshot.VmRestore restored;
                    try { restored = Snapshot.VmRestore.Open(snapshotDir, parse.GetValue(restoreEager)); }
                    catch (Snapshot.SnapshotException e)
                    {
                        await Console.Error.WriteLineAsync($"actorvmm: error: cannot restore: {e.Message}");
                        try { await (await starting).Terminate(); }
                        catch (Exception) { } // its own failure to start does not matter now
                        return VmProtocol.Outcome.HostErrorCode;
                    }
                    if (parse.GetValue(name) is null) vm = vm with { Name = restored.Spec.Name };
                    StartupTimes.Mark("snapshot read");
                    return await HostRunner.RunAsync(starting, hocon, vm, restored.ToSpec(vm.Name).Boot,
                        new HostRunner.RunOptions(), Console.Error, restored);
                }
                if (parse.GetValue(restoreEager)) throw new ConfigException("--restore-eager goes with --restore DIR");

                var firmwarePath = parse.GetValue(firmware);
                var flatPath = parse.GetValue(flat);
                string? Boot(string key) => hocon.GetString($"actorvmm.vm.boot.{key}", "") is { Length: > 0 } v ? v : null;
                var kernelPath = Boot("kernel");
                var initrdPath = Boot("initrd");
                var appendText = Boot("append");
                BootImage boot;
                if (new[] { firmwarePath, flatPath, kernelPath }.Count(p => p is not null) > 1)
                    throw new ConfigException("give one of --firmware, --flat or --kernel");
                if (kernelPath is null && (initrdPath is not null || appendText is not null))
                    throw new ConfigException("--initrd and --append (actorvmm.vm.boot.initrd, .append) go with --kernel (actorvmm.vm.boot.kernel)");
                if (kernelPath is not null)
                {
                    boot = KernelKind.Recognise(ReadImage(kernelPath), kernelPath, appendText ?? "",
                        initrdPath is null ? null : ReadImage(initrdPath), Path.GetFileName(initrdPath ?? "initrd"));
                }
                else if (firmwarePath is not null) boot = new FirmwareImage(ReadImage(firmwarePath));
                else if (flatPath is not null)
                {
                    var address = ParseNumber(parse.GetValue(loadAddress) ?? "0x7C00", "--load-address");
                    var (cs, ip) = parse.GetValue(entry) is { } e ? ParseEntry(e) : FlatImage.DefaultEntry(address);
                    boot = new FlatImage(ReadImage(flatPath), address, cs, ip);
                }
                else throw new ConfigException("nothing to boot: give --kernel FILE, --firmware FILE or --flat FILE (or try 'actorvmm demo')");

                StartupTimes.Mark("config");
                HostRunner.ConfigureLogging();
                return await HostRunner.RunAsync(HostRunner.StartSystem(hocon), hocon, vm, boot, new HostRunner.RunOptions(), Console.Error);
            });
            return command;
        }

        private static Command DemoCommand()
        {
            var trace = new Option<string?>("--trace") { Description = "also write the message trace to FILE as JSON lines" };
            var perfetto = new Option<string?>("--perfetto") { Description = "also write the trace to FILE for the Perfetto UI" };
            var command = new Command("demo", "boot the built-in guest and show its message trace") { trace, perfetto };
            command.SetAction(async (parse, _) =>
            {
                var hocon = ConfigValues.From(new Dictionary<string, string>
                {
                    ["actorvmm.vm.name"] = "demo",
                    ["actorvmm.vm.memory"] = "16M",
                    ["actorvmm.vm.serial.input"] = "none",
                    ["actorvmm.vm.timeout"] = "30",
                    ["actorvmm.vm.trace"] = parse.GetValue(trace) ?? "",
                    ["actorvmm.vm.perfetto"] = parse.GetValue(perfetto) ?? "",
                }).WithFallback(VmConfig.Load(null));
                var vm = VmConfig.From(hocon);
                HostRunner.ConfigureLogging();
                var system = HostRunner.StartSystem(hocon);
                Console.Error.WriteLine("actorvmm demo: booting a 64-bit guest assembled at run time; it prints on COM1 and halts.");
                return await HostRunner.RunAsync(system, hocon, vm, DemoGuest.Build(), new HostRunner.RunOptions(PrintTrace: true), Console.Error);
            });
            return command;
        }

        /// <summary>`actorvmm ctl ...`: talk to running host processes (see HostDirectory).</summary>
        private static Command CtlCommand()
        {
            var ctl = new Command("ctl", "inspect and control running VMs (the seed's vmmctl)");
            var wait = new Option<double>("--wait")
            {
                Description = "seconds to wait for a host to answer (default 5; more for a slow or loaded machine)",
                DefaultValueFactory = _ => Control.ControlClient.DefaultTimeout.TotalSeconds,
                Recursive = true,
            };
            wait.Validators.Add(r =>
            {
                if (r.GetValueOrDefault<double>() is <= 0 or > 3600) r.AddError("--wait takes 0 to 3600 seconds");
            });
            ctl.Add(wait);
            Control.ControlClient Client(System.CommandLine.ParseResult parse) => Control.ControlClient.Create(TimeSpan.FromSeconds(parse.GetValue(wait)));
            Option<string?> Host() => new("--host") { Description = "a host's control address HOST:PORT (default: every announced host)" };
            Option<string?> Directory() => new("--directory") { Description = "where hosts announce themselves" };
            Option<string> Vm() => new("--vm") { Description = "the VM's name", Required = true };

            Command WithVm(string name, string description, Func<Control.ControlClient, Akka.Actor.IActorRef, System.CommandLine.ParseResult, Task<string>> action,
                params Option[] extra)
            {
                var host = Host();
                var dir = Directory();
                var vm = Vm();
                var command = new Command(name, description) { vm, host, dir };
                foreach (var o in extra) command.Add(o);
                command.SetAction(async (parse, _) =>
                {
                    await using var client = Client(parse);
                    var target = await client.FindVmAsync(parse.GetValue(vm)!,
                        Control.ControlClient.Hosts(parse.GetValue(host), parse.GetValue(dir)));
                    Console.Out.Write(await action(client, target, parse));
                    return 0;
                });
                return command;
            }

            {
                var host = Host();
                var dir = Directory();
                var list = new Command("list", "list the running VMs") { host, dir };
                list.SetAction(async (parse, _) =>
                {
                    await using var client = Client(parse);
                    foreach (var h in Control.ControlClient.Hosts(parse.GetValue(host), parse.GetValue(dir)))
                    {
                        var vms = await client.ListAsync(h);
                        foreach (var v in vms.Vms)
                        {
                            var status = await client.StatusAsync(v.Actor);
                            Console.Out.WriteLine($"{v.Name,-16} {status.Phase,-8} vcpus={status.Vcpus,-3} host={vms.Host} pid={vms.Pid}");
                        }
                    }
                    return 0;
                });
                ctl.Add(list);
            }
            var vcpu = new Option<int>("--vcpu") { Description = "vcpu number", DefaultValueFactory = _ => 0 };
            ctl.Add(WithVm("regs", "dump a vcpu's registers and the code at RIP", async (c, vm, parse) =>
            {
                var (regs, code, linear) = await c.RegistersAsync(vm, parse.GetValue(vcpu));
                var lapic = await c.LapicAsync(vm, parse.GetValue(vcpu));
                return Control.RegisterDump.Format(regs, code, linear) + lapic;
            }, vcpu));
            ctl.Add(WithVm("pause", "pause every vcpu", async (c, vm, _) => $"{(await c.PauseAsync(vm)).Phase}\n"));
            ctl.Add(WithVm("resume", "resume a paused VM", async (c, vm, _) => $"{(await c.ResumeAsync(vm)).Phase}\n"));
            ctl.Add(WithVm("stop", "stop the VM", async (c, vm, _) => $"{(await c.StopAsync(vm)).Phase}\n"));
            var snapshotTo = new Option<string>("--to") { Description = "the directory to write the snapshot to (new or empty)", Required = true };
            var snapshotStop = new Option<bool>("--stop") { Description = "end the VM once it is snapshotted" };
            ctl.Add(WithVm("snapshot", "pause the VM, save all of its state to a directory, resume it (run --restore DIR starts it again)",
                async (c, vm, parse) => await c.SnapshotAsync(vm, parse.GetValue(snapshotTo)!, parse.GetValue(snapshotStop)), snapshotTo, snapshotStop));
            ctl.Add(WithVm("stats", "counters of vcpus, devices and memory", async (c, vm, _) => await c.StatsAsync(vm)));
            var faultActor = new Option<string>("--actor") { Description = "the actor below the VM: uart0, vcpu-0, vmspace, ... (--fail-page-faults: vmspace)" };
            var crash = new Option<bool>("--crash") { Description = "make the actor throw (its supervisor restarts or stops it)" };
            var stall = new Option<int?>("--stall") { Description = "stall the actor's thread for this many milliseconds (a vcpu neither runs nor answers)" };
            var failFaults = new Option<int?>("--fail-page-faults") { Description = "fail the vmspace's next N nested page faults (the VM stops with a report)" };
            var gpa = new Option<string?>("--gpa") { Description = "with --fail-page-faults: only faults on the page of this guest physical address" };
            ctl.Add(WithVm("fault", "inject a fault into a live VM", async (c, vm, parse) =>
            {
                const string reason = "injected by actorvmm ctl";
                var actor = parse.GetValue(faultActor);
                var chosen = (parse.GetValue(crash) ? 1 : 0) + (parse.GetValue(stall) is null ? 0 : 1) + (parse.GetValue(failFaults) is null ? 0 : 1);
                if (chosen != 1) throw new Control.ControlException("say which one fault: --crash, --stall MS or --fail-page-faults N");
                if (parse.GetValue(failFaults) is { } count)
                {
                    if (actor is not null and not "vmspace") throw new Control.ControlException("--fail-page-faults goes to the vmspace: leave out --actor or give --actor vmspace");
                    var page = parse.GetValue(gpa) is { } text ? ParseNumber(text, "--gpa") : (ulong?)null;
                    return await c.InjectAsync(vm, "vmspace", new FaultProtocol.FailNestedPageFaults(count, page, reason), TimeSpan.Zero);
                }
                if (actor is null) throw new Control.ControlException("say which actor: --actor uart0, vcpu-0, vmspace, ...");
                if (parse.GetValue(stall) is { } ms)
                {
                    if (ms < 0 || ms > FaultProtocol.MaxStall.TotalMilliseconds)
                        throw new Control.ControlException($"--stall takes 0 to {FaultProtocol.MaxStall.TotalMilliseconds:0} milliseconds");
                    var duration = TimeSpan.FromMilliseconds(ms);
                    return await c.InjectAsync(vm, actor, new FaultProtocol.Stall(duration, reason), duration);
                }
                return await c.CrashAsync(vm, actor, reason);
            }, faultActor, crash, stall, failFaults, gpa));
            {
                var host = Host();
                var dir = Directory();
                var vm = Vm();
                var follow = new Option<bool>("--follow", "-f") { Description = "print new messages as they happen (Ctrl-C to stop)" };
                var filter = new Option<string?>("--filter") { Description = "actor=NAME,type=NAME,sample=N" };
                var count = new Option<int>("--count", "-n") { Description = "how many lines (default: 50 recent; unlimited with --follow)", DefaultValueFactory = _ => 0 };
                var trace = new Command("trace", "the message trace of a VM: recent messages, or a live tail") { vm, host, dir, follow, filter, count };
                trace.SetAction(async (parse, cancel) =>
                {
                    await using var client = Client(parse);
                    var entry = await client.FindEntryAsync(parse.GetValue(vm)!, Control.ControlClient.Hosts(parse.GetValue(host), parse.GetValue(dir)));
                    var text = parse.GetValue(filter) ?? "";
                    if (!parse.GetValue(follow))
                    {
                        var n = parse.GetValue(count);
                        foreach (var line in await client.RecentTraceAsync(entry, n > 0 ? n : 50, text)) Console.Out.WriteLine(line);
                        return 0;
                    }
                    using var stop = CancellationTokenSource.CreateLinkedTokenSource(cancel);
                    Console.CancelKeyPress += (_, e) => { e.Cancel = true; stop.Cancel(); };
                    await client.FollowTraceAsync(entry, text, parse.GetValue(count), line => Console.Out.WriteLine(line), stop.Token);
                    return 0;
                });
                ctl.Add(trace);
            }
            ctl.Add(WithVm("mem", "guest memory: resident, swapped, held, accessed and dirty pages and nested page faults", async (c, vm, _) => await c.MemoryAsync(vm)));
            return ctl;
        }

        private static byte[] ReadImage(string path)
        {
            try
            {
                if (Directory.Exists(path)) throw new BootException($"image {path} is a directory");
                var bytes = File.ReadAllBytes(path);
                if (bytes.Length == 0) throw new BootException($"image {path} is empty");
                return bytes;
            }
            catch (FileNotFoundException) { throw new BootException($"image {path} does not exist"); }
            catch (DirectoryNotFoundException) { throw new BootException($"image {path} does not exist"); }
            catch (UnauthorizedAccessException) { throw new BootException($"image {path} cannot be read (permission denied)"); }
            catch (IOException e) { throw new BootException($"image {path} cannot be read: {e.Message}"); }
        }

        public static ulong ParseNumber(string text, string what)
        {
            var t = text.Trim();
            var ok = t.StartsWith("0x", StringComparison.OrdinalIgnoreCase)
                ? ulong.TryParse(t[2..], NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out var v)
                : ulong.TryParse(t, NumberStyles.None, CultureInfo.InvariantCulture, out v);
            if (!ok) throw new ConfigException($"{what}: \"{text}\" is not a number (decimal or 0x-hex)");
            return v;
        }

        public static (ushort Cs, ushort Ip) ParseEntry(string text)
        {
            var parts = text.Split(':');
            if (parts.Length == 2 &&
                ushort.TryParse(parts[0], NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out var cs) &&
                ushort.TryParse(parts[1], NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out var ip))
                return (cs, ip);
            throw new ConfigException($"--entry: \"{text}\" is not CS:IP in hex (e.g. 0000:7C00)");
        }
    }
}
