using System.Text;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Guests;
using ActorVmm.Host.Vm;
using ActorVmm.Testing;
using Iced.Intel;
using Xunit;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Integration.Tests;

public sealed class MultibootGuestTests
{
    private const uint Load = 0x10_0000;

    /// <summary>A 32-bit multiboot kernel: checks EAX, prints its command line, '|', its first
    /// module's bytes, then exits through debug-exit with 0 (status 1); a wrong magic exits with 7 (15).</summary>
    private static byte[] Kernel()
    {
        var a = new Assembler(32);
        var fail = a.CreateLabel();
        var puts = a.CreateLabel();
        var putsDone = a.CreateLabel();
        var module = a.CreateLabel();
        var moduleDone = a.CreateLabel();

        a.cmp(eax, 0x2BAD_B002);
        a.jne(fail);
        a.mov(esi, __dword_ptr[ebx + 16]);   // cmdline
        a.call(puts);
        a.mov(dx, 0x3F8);
        a.mov(al, (byte)'|');
        a.@out(dx, al);
        a.mov(esi, __dword_ptr[ebx + 24]);   // mods_addr
        a.mov(ecx, __dword_ptr[esi + 4]);    // mod_end
        a.mov(esi, __dword_ptr[esi]);        // mod_start
        a.Label(ref module);
        a.cmp(esi, ecx);
        a.jae(moduleDone);
        a.mov(al, __byte_ptr[esi]);
        a.@out(dx, al);
        a.inc(esi);
        a.jmp(module);
        a.Label(ref moduleDone);
        a.mov(al, 0);
        a.@out(0xF4, al);
        a.Label(ref fail);
        a.mov(al, 7);
        a.@out(0xF4, al);
        a.cli();
        a.hlt();

        a.Label(ref puts);                    // prints the C string at ESI
        a.mov(dx, 0x3F8);
        var loop = a.CreateLabel();
        a.Label(ref loop);
        a.mov(al, __byte_ptr[esi]);
        a.test(al, al);
        a.jz(putsDone);
        a.@out(dx, al);
        a.inc(esi);
        a.jmp(loop);
        a.Label(ref putsDone);
        a.ret();

        var header = TestElf.MultibootHeader();
        var code = GuestCode.Assemble(a, Load + (ulong)header.Length);
        return TestElf.Build([.. header, .. code], Load, Load + (uint)header.Length);
    }

    [KvmFact]
    public async Task A_multiboot_kernel_reads_its_command_line_and_module()
    {
        var image = new MultibootImage(Kernel(), "kernel answer=42",
            [new MultibootModule(Encoding.ASCII.GetBytes("module-bytes"), "initrd")]);
        await using var run = await GuestRun.RunAsync(image);
        Assert.Equal("kernel answer=42|module-bytes", run.Serial);
        Assert.Equal(VmProtocol.OutcomeKind.DebugExit, run.Outcome.Kind);
        Assert.Equal(1, run.Outcome.ExitCode);
    }
}
