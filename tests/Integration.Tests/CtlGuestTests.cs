using Akka.Actor;
using ActorVmm.Host;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Config;
using ActorVmm.Host.Control;
using ActorVmm.Host.Guests;
using ActorVmm.Host.Vm;
using ActorVmm.Testing;
using ActorVmm.Vcpu;
using Iced.Intel;
using Xunit;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Integration.Tests;

/// <summary>`actorvmm ctl` against a host running a real guest on KVM, over remoting on 127.0.0.1.</summary>
public sealed class CtlGuestTests
{
    private const ulong Code = 0x10_0000;

    [KvmFact]
    public async Task Ctl_regs_of_a_paused_real_guest_shows_the_rip_it_is_known_to_be_at()
    {
        KvmRequirement.Check();
        // The guest loads a marker into RBX, prints 'S', then spins on one jmp whose address is known.
        var a = new Assembler(64);
        a.mov(rbx, 0x0C0F_FEE0_1234_5678L);
        a.mov(dx, 0x3F8);
        a.mov(al, (byte)'S');
        a.@out(dx, al);
        var prefix = GuestCode.Assemble(a, Code);
        var spin = Code + (ulong)prefix.Length;
        byte[] code = [.. prefix, 0xEB, 0xFE]; // jmp $

        var system = HostRunner.CreateSystem(VmConfig.Load(null), ControlClient.HostSystemName, control: true);
        await using var client = ControlClient.Create(TimeSpan.FromMinutes(3)); // remoting is slow to start under emulation
        try
        {
            using var console = SerialConsole.Captured();
            await using var vm = new VmBuilder(system, new VmSpec("spinner", 16 << 20, 1, new LongModeImage(code, Code, Code)))
                .WithStandardDevices(console).Start();
            system.ActorSelection($"/user/{ControlProtocol.DirectoryName}").Tell(new ControlProtocol.Register("spinner", vm.Actor, ActorRefs.Nobody));
            var deadline = DateTime.UtcNow.AddMinutes(2);
            while (console.BytesWritten == 0 && DateTime.UtcNow < deadline) await Task.Delay(5);
            Assert.Equal("S", console.CapturedText());

            var found = await client.FindVmAsync("spinner", [HostRunner.ControlAddress(system)]);
            Assert.Equal(VmProtocol.Phase.Paused, (await client.PauseAsync(found)).Phase);
            var (regs, bytes, linear) = await client.RegistersAsync(found, 0);

            Assert.Equal(VcpuProtocol.State.Paused, regs.State);
            Assert.Equal(spin, regs.General.Rip);
            Assert.Equal(0x0C0F_FEE0_1234_5678UL, regs.General.Rbx);
            Assert.Equal(spin, linear); // identity-mapped by the loader's page tables
            Assert.Equal(new byte[] { 0xEB, 0xFE }, bytes.Take(2).ToArray());
            var text = RegisterDump.Format(regs, bytes, linear);
            Assert.Contains($"RIP={spin:X16}", text);
            Assert.Contains("jmp", text);

            Assert.Equal(VmProtocol.Phase.Running, (await client.ResumeAsync(found)).Phase);
        }
        finally
        {
            await system.Terminate();
        }
    }
}
